"""Throughput of the generation engine against a local OpenAI-compatible server with fixed latency.

With C requests in flight and a server that takes L ms per request, the ideal rate is C / L requests per
second; the ratio achieved / ideal shows how much the client itself (SDK, cache writes, accounting)
costs. The server runs in its own process (tests/fake_openai_server.py, uvloop + httptools) so it does not
share the client's GIL. Because this machine may have only 2 cores, the same load is also sent by a bare
HTTP client (no SDK, no cache) — "server alone" — to show how much of any shortfall is the machine.

A second run over the same requests with the warm cache must send zero requests.

    python scripts/bench_generate.py --requests 1000 --concurrency 32 --latency-ms 100

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synthpert.chat import ChatRequest  # noqa: E402
from synthpert.chat.client import ChatEngine  # noqa: E402
from synthpert.config.client import ClientConfig  # noqa: E402


def start_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--latency-ms",
                             str(latency_ms)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    base = f"http://127.0.0.1:{int(line.split()[1])}"
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)
    return proc, base


def server_stats(base: str) -> dict:
    return json.loads(urllib.request.urlopen(base + "/_control/stats", timeout=5).read())


def make_requests(n: int, tag: str) -> list[ChatRequest]:
    return [ChatRequest(id=f"r{i}", messages=[
        {"role": "system", "content": "You are a biologist."},
        {"role": "user", "content": f"[{tag}] Analyze the regulatory effect of knocking down the G{i} gene on "
                                    f"the H{i} gene in a single-cell K562 cell line using CRISPR interference."}],
        sampling={"temperature": 0.7, "max_tokens": 512}) for i in range(n)]


async def bare_client(base: str, requests: list[ChatRequest], concurrency: int) -> float:
    """Server alone: the same bodies over one pooled HTTP client, no SDK, no cache, no accounting."""
    import httpx2

    queue = list(reversed(requests))
    async with httpx2.AsyncClient(base_url=base, timeout=60,
                                  limits=httpx2.Limits(max_connections=concurrency * 2)) as client:
        async def worker():
            while queue:
                r = queue.pop()
                resp = await client.post("/v1/chat/completions", json={"model": "fake-model",
                                                                       "messages": r.messages, **r.sampling})
                resp.raise_for_status()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=3, help="alternate server-alone and engine runs; report medians")
    ap.add_argument("--skip-bare", action="store_true", help="do not measure the server alone")
    args = ap.parse_args()
    ideal = args.concurrency / (args.latency_ms / 1000)
    proc, base = start_server(args.latency_ms)
    os.environ["BENCH_FAKE_KEY"] = "sk-bench-not-a-real-key"
    cfg = ClientConfig(model="fake-model", base_url=base + "/v1", api_key_env="BENCH_FAKE_KEY",
                       concurrency=args.concurrency, timeout=30, progress=False,
                       prices={"fake-model": {"input": 0.15, "output": 0.6}})
    bare_rps, engine_rps, cpu_ms = [], [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # Alternate the two measurements so that load from other processes hits both alike.
            for rep in range(args.repeats):
                if not args.skip_bare:
                    bare_s = asyncio.run(bare_client(base, make_requests(args.requests, f"bare{rep}"),
                                                     args.concurrency))
                    bare_rps.append(args.requests / bare_s)
                reqs = make_requests(args.requests, f"engine{rep}")
                engine = ChatEngine(cfg, Path(tmp) / f"cache{rep}.sqlite")
                before = server_stats(base)["received"]
                t0, c0 = time.perf_counter(), time.process_time()
                run = engine.run(reqs)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                sent = server_stats(base)["received"] - before
                assert run.stats.completed == args.requests and sent == args.requests, run.stats.to_dict()
                engine_rps.append(args.requests / elapsed)
                cpu_ms.append(1000 * cpu / args.requests)
                print(f"repeat {rep}: engine {engine_rps[-1]:.0f} req/s"
                      + (f", server alone {bare_rps[-1]:.0f} req/s" if bare_rps else ""), file=sys.stderr)
            before = server_stats(base)["received"]
            rerun = engine.run(reqs)  # the last run's requests again, warm cache
            rerun_requests = server_stats(base)["received"] - before
            assert rerun.stats.completed == args.requests
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    achieved = statistics.median(engine_rps)
    result = {"concurrency": args.concurrency, "latency_ms": args.latency_ms, "requests": args.requests,
              "repeats": args.repeats, "cpu_cores": os.cpu_count(), "ideal_rps": round(ideal, 1),
              "achieved_rps": round(achieved, 1), "ratio": round(achieved / ideal, 3),
              "rerun_requests": rerun_requests,
              "client_cpu_ms_per_request": round(statistics.median(cpu_ms), 2),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    if bare_rps:
        result["server_alone_rps"] = round(statistics.median(bare_rps), 1)
        result["server_alone_ratio"] = round(statistics.median(bare_rps) / ideal, 3)
        result["engine_vs_server_alone"] = round(achieved / statistics.median(bare_rps), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
