"""The response cache: every chat response in SQLite, content-addressed by model, messages and sampling.

The same database holds the Batch API jobs (``batch_jobs``, ``batch_items``): a job's id and the keys it
carries are committed before anything waits on it, so a process killed while a batch is in flight leaves
behind what a rerun needs to poll it instead of paying for the same requests again. ``batch_answers`` names
the responses bought at the batch price.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from ..errors import SynthpertError

# SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN (primary codes): the folder is
# read-only or full; the file itself may be fine
CANNOT_WRITE = {3, 8, 10, 13, 14}


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
            self.conn.execute("CREATE TABLE IF NOT EXISTS batch_jobs (batch_id TEXT PRIMARY KEY, base_url TEXT NOT "
                              "NULL, model TEXT NOT NULL, input_file_id TEXT NOT NULL, requests INTEGER NOT NULL, "
                              "status TEXT NOT NULL, collected INTEGER NOT NULL, created REAL NOT NULL, "
                              "updated REAL NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS batch_items (key TEXT NOT NULL, batch_id TEXT NOT NULL, "
                              "PRIMARY KEY (key, batch_id))")
            self.conn.execute("CREATE TABLE IF NOT EXISTS batch_answers (key TEXT PRIMARY KEY, batch_id TEXT NOT NULL)")
        except sqlite3.DatabaseError as e:
            if ((getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF) in CANNOT_WRITE:  # the disk, not the file
                raise SynthpertError(f"response cache {self.path}: cannot write it ({e}); make {self.path.parent} "
                                     "writable or free space, then rerun (cached answers are kept)") from None
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

    def put_batch(self, key: str, model: str, request: dict, response: dict, batch_id: str) -> None:
        """A response that came back through a batch: stored and marked, in one transaction, so its price
        (the batch price) is never lost even if the process dies right after."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.put(key, model, request, response)
            self.conn.execute("INSERT OR REPLACE INTO batch_answers VALUES (?, ?)", (key, batch_id))

    def batch_answered(self, keys: list[str]) -> set[str]:
        return self._keys_in("batch_answers", keys)

    def batch_submitted(self, keys: list[str]) -> set[str]:
        """Keys that went out in any batch job (finished or not)."""
        return self._keys_in("batch_items", keys)

    def _keys_in(self, table: str, keys: list[str]) -> set[str]:
        out: set[str] = set()
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            q = f"SELECT DISTINCT key FROM {table} WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(k for (k,) in self.conn.execute(q, chunk))
        return out

    def add_batch_job(self, batch_id: str, base_url: str, model: str, input_file_id: str, keys: list[str],
                      status: str) -> None:
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT OR REPLACE INTO batch_jobs VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                              (batch_id, base_url, model, input_file_id, len(keys), status, now, now))
            self.conn.executemany("INSERT OR IGNORE INTO batch_items VALUES (?, ?)", [(k, batch_id) for k in keys])

    def rename_batch_job(self, old: str, new: str, status: str) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("UPDATE batch_jobs SET batch_id = ?, status = ?, updated = ? WHERE batch_id = ?",
                              (new, status, time.time(), old))
            self.conn.execute("UPDATE batch_items SET batch_id = ? WHERE batch_id = ?", (new, old))

    def forget_batch_job(self, batch_id: str) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("DELETE FROM batch_jobs WHERE batch_id = ?", (batch_id,))
            self.conn.execute("DELETE FROM batch_items WHERE batch_id = ?", (batch_id,))

    def update_batch_job(self, batch_id: str, status: str, collected: bool = False) -> None:
        self.conn.execute("UPDATE batch_jobs SET status = ?, collected = ?, updated = ? WHERE batch_id = ?",
                          (status, int(collected), time.time(), batch_id))

    def batch_jobs(self, base_url: str | None = None, open_only: bool = False) -> list[dict]:
        """Jobs in creation order; ``open_only``: those whose results are not yet joined into the cache."""
        q = "SELECT * FROM batch_jobs WHERE 1=1"
        args: list = []
        if base_url is not None:
            q, args = q + " AND base_url = ?", [base_url]
        if open_only:
            q += " AND collected = 0"
        cur = self.conn.execute(q + " ORDER BY created", args)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur]

    def batch_job_keys(self, batch_id: str) -> list[str]:
        return [k for (k,) in self.conn.execute("SELECT key FROM batch_items WHERE batch_id = ?", (batch_id,))]

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.conn.close()
