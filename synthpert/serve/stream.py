"""Streaming for `synthpert serve`'s /v1/chat/completions: server-sent events in OpenAI's chunk format, token
by token from a backend that can stream, or as one chunk from one that cannot."""

from __future__ import annotations

import asyncio
import json

from ..answer import open_tag_suffix
from .http import _error_body, log, request_id_of

# Event sources yield ("delta", text, [logprob entries] | None), then ("end", finish_reason, prompt, completion).


class _Deltas:
    """Turns a growing list of token ids into text deltas. Text is held back while it ends with the start of
    one of answer.TAGS or inside a multi-byte character, so every tag and every character arrive whole in
    one chunk, and the deltas concatenate to exactly the text a non-streaming request returns."""

    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        tail = text[len(self.sent):]
        tail = tail[:len(tail) - open_tag_suffix(tail)]
        self.sent += tail
        return tail

    def rest(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        tail, self.sent = text[len(self.sent):], text
        return tail


async def _token_stream(backend, messages, sampling):
    """Token-by-token from a backend with ``stream``; the model stops at its next step when the consumer goes
    away (client disconnect, request timeout), so no work outlives the request."""
    import threading

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def post(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            cancel.set()

    def work():
        try:
            query = backend.prepare(messages)
            gen = backend.stream(query, lambda t, lp: post(("token", t, lp)), cancel, **sampling)
            post(("end", gen.finish_reason, len(query.prompt_ids or []), gen.completion_tokens))
        except Exception as e:  # noqa: BLE001 - handed to the event loop, which reports it in the stream
            post(("error", e))

    worker = loop.run_in_executor(None, work)
    deltas, pending = _Deltas(backend.tokenizer), []
    try:
        while True:
            item = await queue.get()
            if item[0] == "token":
                if item[2] is not None:
                    pending.append(item[2])
                text = deltas.push(item[1])
                if text:
                    yield ("delta", text, pending if sampling["logprobs"] is not None else None)
                    pending = []
            elif item[0] == "end":
                text = deltas.rest()
                if text or pending:
                    yield ("delta", text, pending if sampling["logprobs"] is not None else None)
                yield item
                return
            else:
                raise item[1]
    finally:
        cancel.set()
        if not worker.done():
            worker.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning


async def _whole_stream(batcher, key, messages):
    """For backends that cannot stream: the whole completion from the batcher, sent as one content chunk."""
    [(q, [g])] = await batcher.submit(key, [messages])
    yield ("delta", g.text, g.logprobs if key[-1] is not None else None)
    yield ("end", g.finish_reason or "stop", len(q.prompt_ids or []), g.completion_tokens)


async def _sse(events, cid: str, made: int, name: str, include_usage: bool, scope):

    def chunk(delta: dict, finish=None, logprobs=None, usage=None, choices=True) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": made, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
                if choices else []}
        if include_usage:  # OpenAI: null on every chunk but the last, which has no choices
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in events:
            if ev[0] == "delta":
                yield chunk({"content": ev[1]}, logprobs=None if ev[2] is None else {"content": ev[2],
                                                                                     "refusal": None})
            else:
                _, finish, prompt, completion = ev
                yield chunk({}, finish=finish)
                if include_usage:
                    yield chunk({}, usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                           "total_tokens": prompt + completion}, choices=False)
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event, like OpenAI's
        rid = request_id_of(scope)
        log.error("error while streaming request %s: %r", rid, exc, exc_info=exc)
        body = _error_body(f"internal server error (request id {rid})", "server_error", code="internal_error",
                           request_id=rid)
        yield f"data: {json.dumps(body)}\n\n".encode()
    yield b"data: [DONE]\n\n"


