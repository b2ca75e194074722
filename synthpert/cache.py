"""The response cache: every chat response in SQLite, content-addressed by model, messages and sampling."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from .errors import SynthpertError


def cache_key(model: str, messages: list[dict], sampling: dict, extra: dict | None = None) -> str:
    payload = {"model": model, "messages": messages, "sampling": sampling}
    if extra:
        payload["extra"] = extra
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """SQLite in WAL mode; each response is committed on arrival.

    WAL + synchronous=NORMAL survives the process being killed at any instant (a commit is atomic and
    durable against process death; only an OS crash could roll back the last commits).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                              "request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)")
        except sqlite3.DatabaseError as e:
            raise SynthpertError(f"response cache {self.path} is not a usable SQLite database ({e}); move it "
                                 "aside to start a fresh cache") from None

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            q = f"SELECT key, response FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
            for k, resp in self.conn.execute(q, chunk):
                out[k] = json.loads(resp)
        return out

    def put(self, key: str, model: str, request: dict, response: dict) -> None:
        self.conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                          (key, model, json.dumps(request, ensure_ascii=False),
                           json.dumps(response, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.conn.close()
