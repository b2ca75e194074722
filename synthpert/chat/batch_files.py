"""The OpenAI Batch API's file format: request files written (within the API's limits, one model per file) and
output files parsed, line by line, keeping every valid line of a damaged file. Also what ``vllm run-batch``
reads and writes. The jobs themselves (submit, poll, collect) are synthpert.batch's."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .requests import Call, shape_problem
from ..errors import SynthpertError
from .ratelimit import RETRYABLE_STATUS

log = logging.getLogger("synthpert.batch")

ENDPOINT = "/v1/chat/completions"


def batch_line(call: Call) -> dict:
    """One request of a Batch input file (also what ``vllm run-batch`` reads)."""
    return {"custom_id": call.key, "method": "POST", "url": ENDPOINT,
            "body": {"model": call.model, "messages": call.messages, **call.sampling}}


def _encode(line: dict) -> bytes:
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def chunk_calls(calls: list[Call], max_requests: int, max_bytes: int) -> list[tuple[str, list[Call], bytes]]:
    """Input files as (model, calls, JSONL bytes): one model per file, within both limits, calls in order."""
    by_model: dict[str, list[Call]] = {}
    for c in calls:
        by_model.setdefault(c.model, []).append(c)
    out: list[tuple[str, list[Call], bytes]] = []
    for model, group in by_model.items():
        cur: list[Call] = []
        parts: list[bytes] = []
        size = 0
        for c in group:
            line = _encode(batch_line(c))
            if len(line) > max_bytes:
                raise SynthpertError(f"one request ({len(line):,} bytes) is larger than batch_max_bytes="
                                     f"{max_bytes:,}; it cannot go through the Batch API (set batch: false)")
            if cur and (len(cur) >= max_requests or size + len(line) > max_bytes):
                out.append((model, cur, b"".join(parts)))
                cur, parts, size = [], [], 0
            cur.append(c)
            parts.append(line)
            size += len(line)
        if cur:
            out.append((model, cur, b"".join(parts)))
    return out


def write_batch_file(calls: list[Call], path: Path) -> int:
    """The requests as one Batch JSONL file (for ``vllm run-batch`` or a manual upload)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        for c in calls:
            f.write(_encode(batch_line(c)))
    tmp.replace(path)
    return len(calls)


# ---------------------------------------------------------------------------------------------------------
# Reading output and error files


@dataclass
class BatchOutput:
    """What one output (or error) file held: answers by key, errors by key with whether a resubmission may
    help, and problems with the file itself (each a sentence naming the line)."""

    answers: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, tuple[str, bool]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def parse_batch_output(text: str, expected: dict[str, int], source: str) -> BatchOutput:
    """Parse a Batch output / error file. ``expected``: the keys the batch carried, each with its number of
    choices (n). Never raises: every damaged line becomes a problem and every good line is kept."""
    out = BatchOutput()
    lines = text.split("\n")
    truncated = bool(lines) and lines[-1] != ""
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = no == len(lines)
        try:
            obj = json.loads(line)
        except ValueError:
            what = "is cut off (truncated file)" if last and truncated else "is not valid JSON"
            out.problems.append(f"{source} line {no} {what}; skipped")
            continue
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(cid, str):
            out.problems.append(f"{source} line {no} has no custom_id; skipped")
            continue
        if cid not in expected:
            out.problems.append(f"{source} line {no}: unknown custom_id {cid[:16]}… (not a request of this batch); "
                                "skipped")
            continue
        if cid in out.answers:
            out.problems.append(f"{source} line {no}: custom_id {cid[:16]}… answered twice; the first answer kept")
            continue
        resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        status, body, err = resp.get("status_code"), resp.get("body"), obj.get("error")
        if status == 200 and isinstance(body, dict):
            problem = shape_problem(body, expected[cid])
            if problem is None:
                out.answers[cid] = body
                out.errors.pop(cid, None)
            else:
                out.errors[cid] = (f"response of the wrong shape: {problem}", True)
            continue
        out.errors[cid] = _line_error(status, body, err)
    return out


def _line_error(status, body, err) -> tuple[str, bool]:
    """(reason, resubmitting may help) of a per-request error line."""
    detail = err if isinstance(err, dict) else (body.get("error") if isinstance(body, dict) else None)
    if isinstance(detail, dict):
        msg = f"{detail.get('code') or detail.get('type') or 'error'}: {detail.get('message') or ''}".strip(": ")
    else:
        msg = str(detail or "no response")
    if isinstance(status, int):
        return f"HTTP {status}: {msg}", status in RETRYABLE_STATUS or status >= 500
    return msg, True  # e.g. batch_expired: the request never ran


# ---------------------------------------------------------------------------------------------------------
# Running batches


def import_batch_file(path: Path, calls: dict[str, Call], cache) -> dict:
    """Join a Batch output file (OpenAI's or ``vllm run-batch``'s format) into ``cache`` by ``custom_id``, for
    ``calls`` keyed by cache key. Damaged lines and ids that are not among ``calls`` are reported and skipped;
    every good line is kept."""
    parsed = parse_batch_output(path.read_text(encoding="utf-8", errors="replace"),
                                {k: int(c.sampling.get("n") or 1) for k, c in calls.items()}, str(path))
    for p in parsed.problems[:5]:
        log.warning("%s", p)
    for k, raw in parsed.answers.items():
        c = calls[k]
        cache.put_batch(k, c.model, {"model": c.model, "messages": c.messages, "sampling": c.sampling}, raw,
                        f"import:{path.name}")
    return {"path": str(path), "imported": len(parsed.answers), "errors": len(parsed.errors),
            "error_examples": dict(list({k[:16]: v[0] for k, v in parsed.errors.items()}.items())[:5]),
            "damaged_lines": len(parsed.problems), "problems": parsed.problems[:10]}
