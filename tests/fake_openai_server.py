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
class ServerState:
    latency_ms: float = 0.0
    responder: Responder = field(default=auto_responder)
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
        return {"received": len(self.received), "completed": self.completed, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "duplicates": dup,
                "faults_left": sum(f.count for f in self.faults)}


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
        n = int(body.get("n") or 1)
        choices, seq = [], 0
        for i in range(n):
            with state.lock:
                state.seq += 1
                seq = state.seq
            text = "I am not sure." if (fault is not None and fault.kind == "garbage") else state.responder(body, i)
            choices.append({"index": i, "finish_reason": "stop", "logprobs": None,
                            "message": {"role": "assistant", "content": f"{text}\n<!-- seq {seq} -->"}})
        prompt = state.prompt_tokens if state.prompt_tokens is not None else len(_all_text(body)) // 4
        usage = {"prompt_tokens": prompt, "completion_tokens": state.completion_tokens * n,
                 "total_tokens": prompt + state.completion_tokens * n,
                 "completion_tokens_details": {"reasoning_tokens": state.reasoning_tokens * n},
                 "prompt_tokens_details": {"cached_tokens": state.cached_tokens}}
        with state.lock:
            state.completed += 1
        # A pre-serialised body: FastAPI's jsonable_encoder would cost more CPU than the whole client.
        return Response(json.dumps({"id": f"chatcmpl-{seq}", "object": "chat.completion", "created": int(time.time()),
                                    "model": body.get("model", "fake-model"), "choices": choices, "usage": usage}),
                        media_type="application/json")

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
        return {"ok": True}

    return app


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
                 cached_tokens: int = 0):
        self.state = ServerState(latency_ms=latency_ms, responder=make_responder(responder),
                                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 reasoning_tokens=reasoning_tokens, cached_tokens=cached_tokens)
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
