"""The Batch API path of the chat engine: requests written as Batch JSONL, submitted, polled, joined back.

    runner = BatchRunner(cfg, api_key, cache, run_dir, progress, stats)
    runner.run(calls, responses)  # every answer lands in the cache, keyed (custom_id) by its cache key

What it guarantees, beyond the chat path's cache:

* ``custom_id`` is the cache key, so an answer joins back into the same cache whichever way it came
  (this process, a rerun, or ``--import-batch`` of a file that went through ``vllm run-batch``);
* input files stay within the API's limits (requests, bytes, one model per file);
* a job's id and its keys are committed to the cache database, and listed in ``<run_dir>/batches.json``,
  BEFORE anything waits on it: a rerun after a kill polls the jobs in flight and submits none of their
  requests again. The keys are committed even before the batch is created (under the uploaded file's id),
  so a kill between the API creating a batch and its id reaching the disk is recovered too: the rerun
  finds the batch by its input file instead of creating a second one;
* a batch that failed, expired or was cancelled, and per-request errors: only the requests still without
  an answer are resubmitted (or reported, with ``batch_resubmit: false``);
* damaged output (a line that is not JSON, an unknown ``custom_id``, a truncated file) is reported by line
  and the valid lines are kept; nothing raises between download and cache;
* usage and cost are recorded at the batch price (``batch_discount`` of the chat prices).

The API key goes to the SDK client only; files written hold request bodies and job ids, never the key.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .accounting import completion_cap, cost_of, estimate_prompt_tokens, price_for, usage_from_raw
from .batch_files import ENDPOINT, chunk_calls, parse_batch_output
from .cache import ResponseCache
from .requests import Call, RunStats
from ..config.client import ClientConfig
from ..errors import SynthpertError, scrub
from ..runs import write_json_atomic

log = logging.getLogger("synthpert.batch")

TERMINAL = ("completed", "failed", "expired", "cancelled")
JOBS_FILE = "batches.json"
PENDING = "pending:"  # a job row whose batch may or may not exist yet: "pending:<input file id>"
MAX_PROBLEMS_LOGGED = 5  # per file: a damaged 50,000-line file must not flood the terminal


class BatchRunner:
    """Submit, poll and collect batches for the calls the cache cannot answer; see the module docstring."""

    def __init__(self, cfg: ClientConfig, api_key: str, cache: ResponseCache, run_dir: Path, progress,
                 stats: RunStats, done_before: int):
        self.cfg, self.key, self.cache, self.run_dir = cfg, api_key, cache, Path(run_dir)
        self.progress, self.stats, self.done_before = progress, stats, done_before
        self.report = {"jobs_created": 0, "jobs_resumed": 0, "requests_submitted": 0, "requests_resubmitted": 0,
                       "rounds": 0, "unanswered": 0, "problems": []}
        self._counts: dict[str, tuple[int, int]] = {}  # batch id -> (completed, failed) of jobs in flight
        self._answered = 0

    def _price(self, model: str):
        return self.cfg.batch_price(price_for(self.cfg.prices, model))

    def _problem(self, msg: str) -> None:
        msg = scrub(msg, self.key)
        self.report["problems"].append(msg)
        log.warning("%s", msg)

    # ---- the run --------------------------------------------------------------------------------------

    def run(self, todo: list[Call], responses: dict) -> None:
        from openai import OpenAI

        self.calls = {c.key: c for c in todo}
        self.responses = responses
        self.last_error: dict[str, tuple[str, bool]] = {}
        self.client = OpenAI(api_key=self.key, base_url=self.cfg.base_url, max_retries=self.cfg.max_retries,
                             timeout=self.cfg.timeout)
        keys = list(self.calls)
        try:
            open_jobs = [self._adopt(j) if j["batch_id"].startswith(PENDING) else j
                         for j in self.cache.batch_jobs(self.cfg.base_url, open_only=True)
                         if set(self.cache.batch_job_keys(j["batch_id"])) & self.calls.keys()]
            self.report["jobs_resumed"] = len(open_jobs)
            if open_jobs:
                log.info("resuming %d batch job(s) already submitted; polling them", len(open_jobs))
            covered = {k for j in open_jobs for k in self.cache.batch_job_keys(j["batch_id"])}
            submitted_before = self.cache.batch_submitted(keys) - covered
            to_submit = [k for k in keys if k not in covered and (k not in submitted_before or self.cfg.batch_resubmit)]
            for k in submitted_before - set(to_submit):
                self.last_error[k] = ("its earlier batch ended without an answer; not resubmitted "
                                      "(batch_resubmit is off)", False)
            jobs = list(open_jobs)
            rounds = 0
            while True:
                if to_submit and rounds < self.cfg.batch_max_rounds:
                    resub = sum(1 for k in to_submit if k in submitted_before or k in self.last_error)
                    self.report["requests_resubmitted"] += resub
                    jobs += self._submit([self.calls[k] for k in to_submit])
                    rounds += 1
                    self.report["rounds"] = rounds
                self._poll(jobs)  # what was submitted is polled even when the budget stopped further rounds
                if self.stats.stopped:
                    break
                missing = [k for k in keys if k not in responses]
                retry = [k for k in missing if self.last_error.get(k, ("", True))[1]]
                if not retry or not self.cfg.batch_resubmit or rounds >= self.cfg.batch_max_rounds:
                    break
                log.warning("%d request(s) came back without an answer; resubmitting only those", len(retry))
                to_submit, jobs = retry, []
        finally:
            self.client.close()
        for k in keys:
            if k not in responses:
                reason = self.last_error.get(k, ("no answer in any batch",))[0]
                self.stats.failed.setdefault(self.calls[k].request.id, reason)
        self.report["unanswered"] = sum(1 for k in keys if k not in responses)
        self.report["jobs"] = [{k: j[k] for k in ("batch_id", "model", "requests", "status")}
                               for j in self.cache.batch_jobs(self.cfg.base_url)]
        self.stats.batch = self.report

    # ---- submitting -----------------------------------------------------------------------------------

    def _submit(self, calls: list[Call]) -> list[dict]:
        calls = self._within_budget(calls)
        jobs = []
        for model, chunk, data in chunk_calls(calls, self.cfg.batch_max_requests, self.cfg.batch_max_bytes):
            keys = [c.key for c in chunk]
            try:
                f = self.client.files.create(file=(f"synthpert-{chunk[0].key[:12]}.jsonl", data), purpose="batch")
            except Exception as e:  # noqa: BLE001 -- every SDK failure becomes one clear message
                raise SynthpertError(self._api_error("uploading a batch input file", e)) from None
            # Committed before the batch exists: whatever instant a kill comes, the rerun knows these keys
            # went out in this file and looks for its batch before creating one.
            pending = PENDING + f.id
            self.cache.add_batch_job(pending, self.cfg.base_url, model, f.id, keys, "creating")
            b = self._create(pending, f.id)
            self._write_jobs_file()
            self.report["jobs_created"] += 1
            self.report["requests_submitted"] += len(keys)
            log.info("batch %s submitted: %d requests to %s", b.id, len(keys), model)
            jobs.append({"batch_id": b.id, "model": model, "requests": len(keys), "status": b.status})
        return jobs

    def _create(self, pending: str, file_id: str):
        import openai

        try:
            b = self.client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h",
                                           metadata={"synthpert": "1"})
        except openai.APIStatusError as e:
            if e.status_code < 500:  # refused: no batch exists, so no row may claim its keys
                self.cache.forget_batch_job(pending)
            raise SynthpertError(self._api_error("creating a batch", e)) from None
        except Exception as e:  # noqa: BLE001 -- the row stays: the rerun looks for the batch first
            raise SynthpertError(self._api_error("creating a batch", e)) from None
        self.cache.rename_batch_job(pending, b.id, b.status)
        return b

    def _adopt(self, job: dict) -> dict:
        """A job row left between upload and the batch id reaching the disk: find the batch created from its
        input file (the API lists newest first), or create it now from the file already uploaded."""
        file_id = job["input_file_id"]
        found = None
        try:
            for b in self.client.batches.list(limit=100):
                if b.input_file_id == file_id:
                    found = b
                    break
                if b.created_at < job["created"] - 600:  # older than our upload: it is not there
                    break
        except Exception as e:  # noqa: BLE001
            raise SynthpertError(self._api_error("looking for a batch created before the last run stopped", e)
                                 ) from None
        if found is not None:
            self.cache.rename_batch_job(job["batch_id"], found.id, found.status)
            log.info("batch %s (input file %s) recovered after an interrupted submission", found.id, file_id)
        else:
            found = self._create(job["batch_id"], file_id)
            self.report["jobs_created"] += 1
        return {**job, "batch_id": found.id, "status": found.status}

    def _within_budget(self, calls: list[Call]) -> list[Call]:
        """With max_cost, submit only as many requests as fit at their worst case (prompt estimate + every
        completion at its cap, batch price): a batch cannot be stopped halfway once it runs."""
        if self.cfg.max_cost is None:
            return calls
        room = self.cfg.max_cost - self.stats.cost_new
        keep = []
        for c in calls:
            price = self._price(c.model)
            n = int(c.sampling.get("n") or 1)
            cap = completion_cap(c.sampling) or self.cfg.completion_tokens_estimate
            worst = 0.0 if price is None else (estimate_prompt_tokens(c.messages) * price.input
                                               + cap * n * price.output) / 1e6
            if worst > room:
                self.stats.stopped = "max_cost"
                log.warning("max_cost=$%.4f: %d of %d requests fit at their worst-case batch price; the rest wait "
                            "for a rerun with a larger --max-cost", self.cfg.max_cost, len(keep), len(calls))
                break
            room -= worst
            keep.append(c)
        return keep

    def _write_jobs_file(self) -> None:
        jobs = [{k: j[k] for k in ("batch_id", "model", "input_file_id", "requests", "status", "collected")}
                for j in self.cache.batch_jobs(self.cfg.base_url)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / JOBS_FILE, {"base_url": self.cfg.base_url, "cache": str(self.cache.path),
                                                     "jobs": jobs})

    def _api_error(self, doing: str, e: Exception) -> str:
        import openai

        if isinstance(e, openai.APIStatusError):
            return (f"HTTP {e.status_code} from {self.cfg.base_url} while {doing}: "
                    f"{scrub(str(e.message), self.key)} (check {self.cfg.api_key_env} and that the endpoint "
                    "offers the Batch API: /v1/files and /v1/batches)")
        return f"{doing} at {self.cfg.base_url} failed: {scrub(str(e), self.key)}"

    # ---- polling and collecting ----------------------------------------------------------------------

    def _poll(self, jobs: list[dict]) -> None:
        import openai

        pending = list(jobs)
        try:
            while pending:
                for job in list(pending):
                    try:
                        b = self.client.batches.retrieve(job["batch_id"])
                    except openai.NotFoundError:
                        self._problem(f"batch {job['batch_id']} is unknown to {self.cfg.base_url} (deleted, or "
                                      "created under another account); its requests count as missing")
                        self.cache.update_batch_job(job["batch_id"], "not_found", collected=True)
                        pending.remove(job)
                        continue
                    except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
                        log.warning("checking batch %s: %s; trying again in %.0f s", job["batch_id"],
                                    scrub(str(e), self.key), self.cfg.batch_poll_interval)
                        continue
                    except openai.APIStatusError as e:
                        raise SynthpertError(self._api_error(f"checking batch {job['batch_id']}", e)) from None
                    counts = b.request_counts
                    self._counts[b.id] = (counts.completed, counts.failed) if counts else (0, 0)
                    if b.status != job["status"]:
                        job["status"] = b.status
                        self.cache.update_batch_job(b.id, b.status)
                        self._write_jobs_file()
                    if b.status in TERMINAL and self._collect(b, job):
                        pending.remove(job)
                        self._counts.pop(b.id, None)
                self._show(len(pending))
                if pending:
                    time.sleep(self.cfg.batch_poll_interval)
        except KeyboardInterrupt:
            self.stats.stopped = "interrupted"
            log.warning("interrupted while waiting: %d batch job(s) keep running on the server and their ids are "
                        "saved; rerun the same command to collect them (nothing is submitted twice)", len(pending))

    def _show(self, in_flight: int) -> None:
        running = sum(c for c, _ in self._counts.values())
        failed = sum(f for _, f in self._counts.values()) + sum(1 for k in self.last_error if k not in self.responses)
        self.progress.set(self.done_before + self._answered + running, self.stats.cost_new,
                          f"batch: {in_flight} job(s) in flight, {failed} failed")

    def _download(self, file_id: str) -> str | None:
        try:
            return self.client.files.content(file_id).content.decode("utf-8", errors="replace")
        except Exception as e:  # noqa: BLE001 -- a failed download is retried on the next poll / rerun
            log.warning("%s; trying again later", self._api_error(f"downloading file {file_id}", e))
            return None

    def _collect(self, b, job: dict) -> bool:
        """Join a finished batch's output and error files into the cache; False if a download failed (the
        job stays open and is collected on the next poll or the rerun)."""
        keys = self.cache.batch_job_keys(b.id)
        expected = {k: int(self.calls[k].sampling.get("n") or 1) if k in self.calls else 1 for k in keys}
        texts = []
        for label, fid in (("output", b.output_file_id), ("error", b.error_file_id)):
            if fid:
                text = self._download(fid)
                if text is None:
                    return False
                texts.append((label, fid, text))
        answers, errors, problems = {}, {}, []
        for label, fid, text in texts:
            parsed = parse_batch_output(text, expected, f"batch {b.id} {label} file {fid}")
            for k, raw in parsed.answers.items():
                answers.setdefault(k, raw)
            errors.update(parsed.errors)
            problems += parsed.problems
        for p in problems[:MAX_PROBLEMS_LOGGED]:
            self._problem(p)
        if len(problems) > MAX_PROBLEMS_LOGGED:
            self._problem(f"batch {b.id}: {len(problems) - MAX_PROBLEMS_LOGGED} more damaged line(s) skipped")
        # A job collected halfway before a kill is collected again on the rerun: what already reached the
        # cache was counted then and must not be counted (or stored) twice.
        already = set(self.cache.get_many(list(answers)))
        for k, raw in answers.items():
            if k in self.responses or k in already:
                continue
            call = self.calls.get(k)
            request = ({"model": call.model, "messages": call.messages, "sampling": call.sampling} if call
                       else {"model": job["model"], "batch_id": b.id})
            self.cache.put_batch(k, job["model"], request, raw, b.id)
            usage = usage_from_raw(raw)
            self.stats.usage_new = self.stats.usage_new + usage
            self.stats.cost_new += cost_of(usage, self._price(job["model"]))
            if call is not None:
                self.responses[k] = raw
                self._answered += 1
            self.last_error.pop(k, None)
        for k, err in errors.items():
            if k not in answers:
                self.last_error[k] = err
        missing = [k for k in keys if k not in answers and k not in errors]
        why = self._batch_reason(b)
        for k in missing:
            self.last_error[k] = (f"batch {b.id} ended {b.status} without a result for it{why}", True)
        n_err = sum(1 for k in keys if k not in answers)
        if b.status != "completed":
            self._problem(f"batch {b.id} ended {b.status}{why}: {len(answers)} of {len(keys)} answered")
        elif n_err:
            example = next((self.last_error[k][0] for k in keys if k not in answers and k in self.last_error), "?")
            self._problem(f"batch {b.id} completed with {n_err} of {len(keys)} request(s) unanswered (error file or "
                          f"missing lines), e.g. {example}")
        self.cache.update_batch_job(b.id, b.status, collected=True)
        self._write_jobs_file()
        return True

    @staticmethod
    def _batch_reason(b) -> str:
        data = getattr(getattr(b, "errors", None), "data", None) or []
        msgs = [f"{getattr(e, 'code', None) or 'error'}: {getattr(e, 'message', '')}" for e in data[:3]]
        return f" ({'; '.join(msgs)})" if msgs else ""
