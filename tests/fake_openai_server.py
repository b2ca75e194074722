"""A real OpenAI-compatible HTTP server for tests and benchmarks (FastAPI + uvicorn on 127.0.0.1).

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` with scripted completions and usage,
counts every request it receives, and injects faults on demand: a status code (429 with ``retry-after``,
500, 503, 400, 401, 404, ...), a slow response past the client's timeout, truncated JSON, a body of the
wrong shape, or unparseable model text.

Two ways to run it:

* in-process (tests): ``with FakeOpenAIServer(latency_ms=50) as srv: ... srv.base_url ...``; uvicorn
  runs in a background thread, so the test reads ``srv.received`` and calls ``srv.inject(...)`` directly;
* as a subprocess (benchmarks, so server and client use different cores):
  ``python tests/fake_openai_server.py --latency-ms 100`` prints ``PORT <n>`` on its first line; the same
  controls are then HTTP endpoints: ``GET /_control/stats``, ``POST /_control/inject``,
  ``POST /_control/reset``.

Responders decide the completion text from the request. Built in (``responder=`` name or a callable
``(body: dict, index: int) -> str``):

* ``"auto"`` (default): a judge verdict ``Rating: good`` for judge prompts, else as ``"answer"``;
* ``"answer"``: a well-formed ``<think>…</think><answer>LABEL</answer>`` trace that mentions the genes and
  cell line of the question and answers the label named after "Observed outcome:" in the prompt (else
  the LAST label mentioned, else "not differentially expressed");
* ``"judge:<rating>"``: a judge verdict ``Rating: <rating>`` with a justification;
* ``"mixed"``: as ``"auto"``, but judge verdicts vary with the prompt (deterministically): two thirds
  ``excellent``, one third ``good`` — a keep rule at ``excellent`` then has something to reject;
* ``"fixed:<text>"``: always that text.

Every completion text ends with a per-server sequence number comment (``<!-- seq N -->``) so a test can
tell which HTTP response produced a stored answer.

A request with ``logprobs: true`` gets OpenAI's ``choices[i].logprobs.content``: one entry per
whitespace-separated word of the text, each with the log-probability ``logprob(body, index)`` (a callable
given to the server; default -0.1), so a test controls each sample's token confidence.

The Batch API, as OpenAI serves it: ``POST /v1/files`` (multipart upload, purpose ``batch``),
``GET /v1/files/{id}`` and ``/v1/files/{id}/content``, ``POST /v1/batches`` and ``GET /v1/batches/{id}``.
Input files are validated as OpenAI does (JSONL, unique ``custom_id``, method POST, the batch's endpoint,
one model, at most 50,000 lines); a batch moves validating -> in_progress -> completed, one step every
``batch_polls`` retrieves (``batch_hold`` keeps it in progress), and its requests are answered by the same
responder and usage as the chat endpoint, into an output file and an error file. ``inject_batch(kind, ...)``
scripts the next batches: ``request_errors`` (n requests fail with a 500, batch completed), ``expire``
(half answered, the rest ``batch_expired``), ``fail`` (validation failure, no output), ``cancel``,
``bad_output`` (a non-JSON line, an unknown ``custom_id`` and a truncated last line). Every submitted
``custom_id`` is counted: ``stats()["batch_duplicates"]`` is how many were submitted more than once.
"""



import argparse
import asyncio
import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable

LABELS = ("upregulated", "downregulated", "not differentially expressed")
Responder = Callable[[dict, int], str]
LogprobFn = Callable[[dict, int], float]


def _last_user_text(body: dict) -> str:
    msgs = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = msgs[-1].get("content", "") if msgs else ""
    return content if isinstance(content, str) else json.dumps(content)


def _all_text(body: dict) -> str:
    return "\n".join(m["content"] for m in body.get("messages", []) if isinstance(m.get("content"), str))


def answer_responder(body: dict, index: int) -> str:
    text = _all_text(body)
    m = re.search(r"observed outcome[^:]*:\s*\**\s*(upregulated|downregulated|not differentially expressed)",
                  text, re.IGNORECASE)
    if m:
        label = m.group(1).lower()
    else:
        found = [(text.lower().rfind(lab), lab) for lab in LABELS if lab in text.lower()]
        label = max(found)[1] if found else LABELS[2]
    q = re.search(r"knocking down the (\S+) gene on the (\S+) gene in a single-cell (\S+) cell line", text)
    pert, gene, cell = q.groups() if q else ("the perturbed gene", "the readout gene", "this")
    reasoning = (f"{pert} knockdown in {cell} cells removes its protein product. {gene} sits downstream of "
                 f"the pathways that {pert} supports, so the loss of {pert} propagates to {gene} "
                 f"through indirect regulation and feedback; the cell-line context of {cell} supports this.")
    return f"<think>\n{reasoning}\n</think>\n<answer>{label}</answer>"


def auto_responder(body: dict, index: int) -> str:
    """Judge prompts (they ask for a 'Rating:' line) get a verdict; everything else a trace."""
    if "Rating: <excellent" in _all_text(body):
        return ("Rating: good\nJustification: the reasoning links the knockdown to the readout gene and agrees "
                "with its answer.")
    return answer_responder(body, index)


def mixed_responder(body: dict, index: int) -> str:
    text = _all_text(body)
    if "Rating: <excellent" in text:
        import hashlib

        rating = "good" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 3 == 0 else "excellent"
        return (f"Rating: {rating}\nJustification: the reasoning links the knockdown to the readout gene and agrees "
                "with its answer.")
    return answer_responder(body, index)


def make_responder(spec: str | Responder) -> Responder:
    if callable(spec):
        return spec
    if spec == "answer":
        return answer_responder
    if spec == "auto":
        return auto_responder
    if spec == "mixed":
        return mixed_responder
    if spec.startswith("judge:"):
        rating = spec.split(":", 1)[1]
        return lambda body, i: (f"Rating: {rating}\nJustification: the reasoning links the knockdown to the "
                                f"readout gene and agrees with its answer.")
    if spec.startswith("fixed:"):
        text = spec.split(":", 1)[1]
        return lambda body, i: text
    raise ValueError(f"unknown responder {spec!r}")


@dataclass
class Fault:
    """One scripted misbehaviour, applied to the next ``count`` requests that reach the server."""

    kind: str  # "status" | "slow" | "truncated" | "wrong_shape" | "garbage"
    count: int = 1
    status: int = 500
    retry_after: float | None = None
    delay: float = 0.0
    message: str = "scripted failure"


@dataclass
class BatchFault:
    """A scripted outcome for the next batch created: request_errors | expire | fail | cancel | bad_output."""

    kind: str
    n: int = 1  # request_errors: how many requests fail


@dataclass
class BatchJob:
    id: str
    input_file_id: str
    endpoint: str
    lines: list
    created_at: int
    status: str = "validating"
    polls: int = 0
    fault: BatchFault | None = None
    error: str | None = None  # validation failure
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0


@dataclass
class ServerState:
    latency_ms: float = 0.0
    responder: Responder = field(default=auto_responder)
    logprob: LogprobFn = field(default=lambda body, index: -0.1)  # per-token log-probability of a choice
    prompt_tokens: int | None = 100  # None: len(prompt chars) // 4
    completion_tokens: int = 50
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    received: list = field(default_factory=list)  # request bodies, in arrival order
    received_at: list = field(default_factory=list)  # time.monotonic() of each arrival
    auth_headers: list = field(default_factory=list)
    completed: int = 0  # responses fully sent with a completion
    in_flight: int = 0
    max_in_flight: int = 0
    faults: list = field(default_factory=list)
    seq: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: dict = field(default_factory=dict)  # file id -> {"bytes", "filename", "purpose", "created_at"}
    batches: dict = field(default_factory=dict)  # batch id -> BatchJob
    batch_submissions: list = field(default_factory=list)  # custom_ids of each batch created, in order
    batch_faults: list = field(default_factory=list)  # BatchFault for the next batches created
    batch_polls: int = 1  # retrieves per status step
    batch_hold: bool = False  # keep batches in progress (a test kills the client meanwhile)
    batch_retrieves: int = 0

    def next_fault(self) -> Fault | None:
        with self.lock:
            while self.faults:
                f = self.faults[0]
                if f.count <= 0:
                    self.faults.pop(0)
                    continue
                f.count -= 1
                return f
            return None

    def stats(self) -> dict:
        keys = [json.dumps(b, sort_keys=True) for b in self.received]
        dup = sum(c - 1 for c in Counter(keys).values())
        submitted = Counter(cid for ids in self.batch_submissions for cid in ids)
        return {"received": len(self.received), "completed": self.completed, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "duplicates": dup,
                "faults_left": sum(f.count for f in self.faults), "batches_created": len(self.batch_submissions),
                "batch_requests_submitted": sum(submitted.values()),
                "batch_duplicates": sum(c - 1 for c in submitted.values()), "batch_retrieves": self.batch_retrieves}


def _logprobs(state: ServerState, body: dict, index: int, content: str) -> dict | None:
    """OpenAI's logprobs object when the request asked for it (None otherwise, as OpenAI sends)."""
    if not body.get("logprobs"):
        return None
    lp = float(state.logprob(body, index))
    return {"content": [{"token": w, "logprob": lp, "bytes": list(w.encode()), "top_logprobs": []}
                        for w in content.split()], "refusal": None}


def completion_body(state: ServerState, body: dict, garbage: bool = False) -> dict:
    """A chat.completion for ``body`` (the chat endpoint and batch requests answer alike)."""
    n = int(body.get("n") or 1)
    choices = []
    for i in range(n):
        with state.lock:
            state.seq += 1
            seq = state.seq
        text = "I am not sure." if garbage else state.responder(body, i)
        content = f"{text}\n<!-- seq {seq} -->"
        choices.append({"index": i, "finish_reason": "stop", "logprobs": _logprobs(state, body, i, content),
                        "message": {"role": "assistant", "content": content}})
    prompt = state.prompt_tokens if state.prompt_tokens is not None else len(_all_text(body)) // 4
    usage = {"prompt_tokens": prompt, "completion_tokens": state.completion_tokens * n,
             "total_tokens": prompt + state.completion_tokens * n,
             "completion_tokens_details": {"reasoning_tokens": state.reasoning_tokens * n},
             "prompt_tokens_details": {"cached_tokens": state.cached_tokens}}
    return {"id": f"chatcmpl-{seq}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake-model"), "choices": choices, "usage": usage}


def validate_batch_input(data: bytes, endpoint: str) -> tuple[list, str | None]:
    """(request lines, None) or ([], the reason OpenAI would fail the batch with)."""
    try:
        lines = [json.loads(x) for x in data.decode("utf-8").splitlines() if x.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        return [], f"invalid JSONL: {e}"
    if not lines:
        return [], "empty input file"
    if len(lines) > 50_000 or len(data) > 200 * 1024 * 1024:
        return [], "input file beyond 50,000 requests or 200 MB"
    ids = [x.get("custom_id") for x in lines]
    if any(not isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        return [], "custom_id missing or not unique"
    if any(x.get("method") != "POST" or x.get("url") != endpoint for x in lines):
        return [], f"every line needs method POST and url {endpoint}"
    if len({(x.get("body") or {}).get("model") for x in lines}) != 1:
        return [], "one model per batch input file"
    return lines, None


def batch_result_files(state: ServerState, job: BatchJob) -> None:
    """Answer a batch's requests into an output file and an error file, as its fault says."""
    fault = job.fault.kind if job.fault else None
    out, err = [], []
    for i, line in enumerate(job.lines):
        cid = line["custom_id"]
        if fault == "cancel" or (fault == "expire" and i >= len(job.lines) // 2):
            code = "batch_expired" if fault == "expire" else "batch_cancelled"
            err.append({"id": f"batch_req_{i}", "custom_id": cid, "response": None,
                        "error": {"code": code, "message": f"This request could not be executed before the batch "
                                  f"was {'expired' if fault == 'expire' else 'cancelled'}."}})
        elif fault == "request_errors" and i < job.fault.n:
            err.append({"id": f"batch_req_{i}", "custom_id": cid, "error": None,
                        "response": {"status_code": 500, "request_id": f"req_{i}",
                                     "body": {"error": {"message": "scripted server error", "type": "server_error"}}}})
        else:
            out.append({"id": f"batch_req_{i}", "custom_id": cid, "error": None,
                        "response": {"status_code": 200, "request_id": f"req_{i}",
                                     "body": completion_body(state, line["body"])}})
    job.completed, job.failed = len(out), len(err)
    text = "".join(json.dumps(x) + "\n" for x in out)
    if fault == "bad_output" and out:
        rows = text.splitlines(keepends=True)
        bogus = json.dumps({**out[0], "custom_id": "not-a-request-of-this-batch"}) + "\n"
        text = rows[0] + "{this is not json\n" + bogus + "".join(rows[1:])
        text = text[:-(len(rows[-1]) // 2)]  # the last line cut off mid-way
        job.completed -= 1
    if out:
        job.output_file_id = _new_file(state, text.encode(), f"{job.id}_output.jsonl", "batch_output")
    if err:
        job.error_file_id = _new_file(state, "".join(json.dumps(x) + "\n" for x in err).encode(),
                                      f"{job.id}_error.jsonl", "batch_output")


def _new_file(state: ServerState, data: bytes, filename: str, purpose: str) -> str:
    with state.lock:
        fid = f"file-{len(state.files) + 1:06d}"
        state.files[fid] = {"bytes": data, "filename": filename, "purpose": purpose, "created_at": int(time.time())}
    return fid


def _file_object(fid: str, f: dict) -> dict:
    return {"id": fid, "object": "file", "bytes": len(f["bytes"]), "created_at": f["created_at"],
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}


def _batch_object(job: BatchJob) -> dict:
    obj = {"id": job.id, "object": "batch", "endpoint": job.endpoint, "input_file_id": job.input_file_id,
           "completion_window": "24h", "status": job.status, "created_at": job.created_at,
           "output_file_id": job.output_file_id, "error_file_id": job.error_file_id,
           "request_counts": {"total": len(job.lines), "completed": job.completed, "failed": job.failed},
           "metadata": {}}
    if job.error:
        obj["errors"] = {"object": "list", "data": [{"code": "invalid_file", "message": job.error, "line": None}]}
    return obj


def advance_batch(state: ServerState, job: BatchJob) -> None:
    """One retrieve's worth of progress: every ``batch_polls`` retrieves the batch moves one status on."""
    job.polls += 1
    if job.polls < state.batch_polls or job.status in ("completed", "failed", "expired", "cancelled"):
        return
    job.polls = 0
    fault = job.fault.kind if job.fault else None
    if job.status == "validating":
        job.status = "failed" if (job.error or fault == "fail") else "in_progress"
        if fault == "fail" and not job.error:
            job.error = "scripted validation failure"
    elif job.status == "in_progress" and not state.batch_hold:
        batch_result_files(state, job)
        job.status = {"expire": "expired", "cancel": "cancelled"}.get(fault, "completed")


def create_app(state: ServerState):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()

    def _error(status: int, message: str, headers: dict | None = None):
        etype = {429: "rate_limit_exceeded", 401: "invalid_api_key", 404: "model_not_found"}.get(status, "error")
        return JSONResponse({"error": {"message": message, "type": etype, "code": etype}}, status_code=status,
                            headers=headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "tests"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with state.lock:
            state.received.append(body)
            state.received_at.append(time.monotonic())
            state.auth_headers.append(request.headers.get("authorization", ""))
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await _answer(body)
        finally:
            with state.lock:
                state.in_flight -= 1

    async def _answer(body: dict):
        fault = state.next_fault()
        if state.latency_ms:
            await asyncio.sleep(state.latency_ms / 1000)
        if fault is not None:
            if fault.kind == "status":
                headers = {"retry-after": str(fault.retry_after)} if fault.retry_after is not None else None
                return _error(fault.status, fault.message, headers)
            if fault.kind == "slow":
                await asyncio.sleep(fault.delay)
            if fault.kind == "truncated":
                return Response('{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind',
                                media_type="application/json")
            if fault.kind == "wrong_shape":
                return JSONResponse({"id": "chatcmpl-x", "object": "chat.completion", "created": 0,
                                     "model": body.get("model"), "choices": []})
        out = completion_body(state, body, garbage=fault is not None and fault.kind == "garbage")
        with state.lock:
            state.completed += 1
        # A pre-serialised body: FastAPI's jsonable_encoder would cost more CPU than the whole client.
        return Response(json.dumps(out), media_type="application/json")

    @app.post("/v1/files")
    async def upload(request: Request):
        form = await request.form()
        state.auth_headers.append(request.headers.get("authorization", ""))
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return _error(400, "a file and purpose=batch are required")
        fid = _new_file(state, await upload.read(), upload.filename or "upload.jsonl", "batch")
        return JSONResponse(_file_object(fid, state.files[fid]))

    @app.get("/v1/files/{fid}")
    async def file_info(fid: str):
        if fid not in state.files:
            return _error(404, f"No such File object: {fid}")
        return JSONResponse(_file_object(fid, state.files[fid]))

    @app.get("/v1/files/{fid}/content")
    async def file_content(fid: str):
        if fid not in state.files:
            return _error(404, f"No such File object: {fid}")
        return Response(state.files[fid]["bytes"], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        body = await request.json()
        state.auth_headers.append(request.headers.get("authorization", ""))
        f = state.files.get(body.get("input_file_id"))
        if f is None:
            return _error(404, f"No such File object: {body.get('input_file_id')}")
        if body.get("completion_window") != "24h":
            return _error(400, "completion_window must be 24h")
        lines, problem = validate_batch_input(f["bytes"], body.get("endpoint", ""))
        with state.lock:
            bid = f"batch_{len(state.batches) + 1:06d}"
            fault = state.batch_faults.pop(0) if state.batch_faults else None
            job = BatchJob(bid, body["input_file_id"], body.get("endpoint", ""), lines, int(time.time()),
                           fault=fault, error=problem)
            state.batches[bid] = job
            state.batch_submissions.append([x["custom_id"] for x in lines])
        return JSONResponse(_batch_object(job))

    @app.get("/v1/batches")
    async def list_batches():
        data = [_batch_object(j) for j in reversed(list(state.batches.values()))]  # newest first, as OpenAI
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    @app.get("/v1/batches/{bid}")
    async def retrieve_batch(bid: str):
        job = state.batches.get(bid)
        if job is None:
            return _error(404, f"No such Batch object: {bid}")
        with state.lock:
            state.batch_retrieves += 1
        advance_batch(state, job)
        return JSONResponse(_batch_object(job))

    @app.get("/_control/stats")
    async def stats():
        return state.stats()

    @app.post("/_control/inject")
    async def inject(request: Request):
        spec = await request.json()
        with state.lock:
            state.faults.append(Fault(**spec))
        return {"ok": True}

    @app.post("/_control/reset")
    async def reset():
        with state.lock:
            state.received.clear()
            state.received_at.clear()
            state.auth_headers.clear()
            state.faults.clear()
            state.completed = 0
            state.max_in_flight = 0
            state.batch_submissions.clear()
            state.batch_faults.clear()
        return {"ok": True}

    @app.post("/_control/batch")
    async def batch_control(request: Request):
        spec = await request.json()
        with state.lock:
            if "hold" in spec:
                state.batch_hold = bool(spec["hold"])
            if "polls" in spec:
                state.batch_polls = int(spec["polls"])
            if "fault" in spec:
                state.batch_faults.append(BatchFault(**spec["fault"]))
        return {"ok": True}

    return app


def run_batch_file(in_path, out_path, responder: str | Responder = "auto") -> int:
    """What ``vllm run-batch -i IN -o OUT`` does, without a model: one output line per input request."""
    state = ServerState(responder=make_responder(responder))
    with open(in_path, encoding="utf-8") as src, open(out_path, "w", encoding="utf-8") as dst:
        n = 0
        for i, raw in enumerate(src):
            line = json.loads(raw)
            dst.write(json.dumps({"id": f"vllm-{i}", "custom_id": line["custom_id"], "error": None,
                                  "response": {"status_code": 200, "request_id": f"vllm-batch-{i}",
                                               "body": completion_body(state, line["body"])}}) + "\n")
            n += 1
    return n


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


class FakeOpenAIServer:
    """The server in a background thread of this process. Use as a context manager."""

    def __init__(self, latency_ms: float = 0.0, responder: str | Responder = "auto", *,
                 prompt_tokens: int | None = 100, completion_tokens: int = 50, reasoning_tokens: int = 0,
                 cached_tokens: int = 0, logprob: LogprobFn | None = None):
        self.state = ServerState(latency_ms=latency_ms, responder=make_responder(responder),
                                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 reasoning_tokens=reasoning_tokens, cached_tokens=cached_tokens)
        if logprob is not None:
            self.state.logprob = logprob
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def received(self) -> list:
        return self.state.received

    def stats(self) -> dict:
        return self.state.stats()

    def inject(self, kind: str, count: int = 1, **kw) -> None:
        with self.state.lock:
            self.state.faults.append(Fault(kind=kind, count=count, **kw))

    def inject_batch(self, kind: str, n: int = 1) -> None:
        """Script the outcome of the next batch created (see the module docstring)."""
        with self.state.lock:
            self.state.batch_faults.append(BatchFault(kind=kind, n=n))

    def set_responder(self, responder: str | Responder) -> None:
        self.state.responder = make_responder(responder)

    def start(self) -> "FakeOpenAIServer":
        import uvicorn

        sock = _free_socket()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.state), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--responder", default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--completion-tokens", type=int, default=50)
    args = ap.parse_args(argv)
    state = ServerState(latency_ms=args.latency_ms, responder=make_responder(args.responder),
                        prompt_tokens=args.prompt_tokens, completion_tokens=args.completion_tokens)
    sock = _free_socket()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                            loop="uvloop", http="httptools", backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
