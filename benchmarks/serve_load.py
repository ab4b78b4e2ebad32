"""Load test of ``maskkv serve`` on loopback: concurrent streaming clients at several concurrency levels.

For each KV policy (default: maskkv and full, same prompt length, same run) it starts a server
subprocess on 127.0.0.1, then at each concurrency level runs a bounded number of streamed
completions (bounded in count and in seconds) and reports requests/s, generated tokens/s, time to
first chunk and end-to-end latency (p50 / p99), failed requests (must be 0) and the KV pages still
held once the server is idle (must be 0, read from /metrics). Prints a table last; writes JSON to
benchmarks/out/serve_load.json.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py            # tiny random LLaDA, a few minutes on 2 CPUs
    python benchmarks/serve_load.py --model DIR --policies maskkv,full --prompt-len 2048 --kv-budget 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from maskkv_engine.entrypoints import cli


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def tiny_model(workdir: Path) -> str:
    """A random-weight LLaDA with a word tokenizer, calibrated so MaskKV evicts layer by layer."""
    path = workdir / "tiny-llada"
    cli.main(["random-checkpoint", "--out", str(path), "--hidden", "128", "--layers", "4", "--heads", "4",
              "--mlp", "256", "--vocab", "512", "--max-len", "4096"])  # fmt: skip
    cli.main(["calibrate", "--model", str(path), "--num-prompts", "2", "--prompt-len", "256", "--gen-length", "16",
              "--random-prompts"])  # fmt: skip
    return str(path)


class Server:
    def __init__(self, model: str, policy: str, kv_budget: int, port: int, max_num_seqs: int):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "maskkv_engine.entrypoints.cli", "serve", "--model", model,
               "--served-model-name", "bench", "--kv-policy", policy, "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]  # fmt: skip
        if policy not in ("none", "full"):
            cmd += ["--kv-budget", str(kv_budget)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def gauges(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for name in ("maskkv_num_requests_running", "maskkv_num_requests_waiting", "maskkv_kv_pages_used",
                     "maskkv_kv_pages_reserved"):  # fmt: skip
            m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
            out[name] = float(m.group(1)) if m else float("nan")
        return out

    def held_pages_when_idle(self, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while True:
            g = self.gauges()
            idle = g["maskkv_num_requests_running"] == 0 and g["maskkv_num_requests_waiting"] == 0
            if idle or time.monotonic() > deadline:
                return g["maskkv_kv_pages_used"] + g["maskkv_kv_pages_reserved"]
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "error": f"{r.status_code} {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"]["message"]}
            if first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    return {"ok": True, "ttfc": first if first is not None else end, "e2e": end, "tokens": tokens}


async def run_level(url: str, concurrency: int, num_requests: int, max_seconds: float, args) -> dict:
    rng = random.Random(concurrency)
    bodies = [
        {"model": "bench", "prompt": " ".join(f"w{rng.randrange(200)}" for _ in range(args.prompt_len)),
         "max_tokens": args.max_tokens, "steps": args.steps, "block_length": args.block_length,
         "stream": True, "stream_options": {"include_usage": True}, "seed": i, "ignore_eos": True}
        for i in range(num_requests)
    ]  # fmt: skip
    results: list[dict] = []
    queue = list(reversed(bodies))
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 120, limits=limits) as client:

        async def worker() -> None:
            while queue and time.perf_counter() < deadline:
                body = queue.pop()
                try:
                    results.append(await one_request(client, body))
                except httpx.HTTPError as e:
                    results.append({"ok": False, "error": repr(e)})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
        "seconds": elapsed,
        "req_per_s": len(ok) / elapsed,
        "tok_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttfc_p50": percentile([r["ttfc"] for r in ok], 50),
        "ttfc_p99": percentile([r["ttfc"] for r in ok], 99),
        "e2e_p50": percentile([r["e2e"] for r in ok], 50),
        "e2e_p99": percentile([r["e2e"] for r in ok], 99),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: a tiny random LLaDA, calibrated)")
    p.add_argument("--policies", default="maskkv,full")
    p.add_argument("--kv-budget", type=int, default=32, help="maskkv: prompt KV pairs kept per head on average")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt words (one token each with the tiny model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=None, help="per level (default: 2 x concurrency, at least 8)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="per level: no new request after this")
    p.add_argument("--port", type=int, default=18700)
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "serve_load.json"))
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        rows = []
        for k, policy in enumerate(args.policies.split(",")):
            server = Server(model, policy, args.kv_budget, args.port + k, max_num_seqs=max(levels))
            try:
                server.wait_ready()
                asyncio.run(run_level(server.url, 2, 2, 60, args))  # warm-up, not reported
                for c in levels:
                    n = args.requests or max(8, 2 * c)
                    row = asyncio.run(run_level(server.url, c, n, args.max_seconds, args))
                    row.update(policy=policy, pages_held_after=server.held_pages_when_idle())
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nprompt {args.prompt_len} tokens, max_tokens {args.max_tokens}, steps {args.steps}, "
          f"maskkv kv_budget {args.kv_budget}; streamed completions over loopback")  # fmt: skip
    head = f"{'policy':<8}{'conc':>5}{'reqs':>6}{'fail':>5}{'req/s':>8}{'tok/s':>9}"
    head += f"{'ttfc p50':>10}{'ttfc p99':>10}{'e2e p50':>9}{'e2e p99':>9}{'pages':>7}"
    print(head)
    for r in rows:
        print(f"{r['policy']:<8}{r['concurrency']:>5}{r['requests']:>6}{r['failed']:>5}{r['req_per_s']:>8.2f}"
              f"{r['tok_per_s']:>9.1f}{r['ttfc_p50']:>10.3f}{r['ttfc_p99']:>10.3f}{r['e2e_p50']:>9.3f}"
              f"{r['e2e_p99']:>9.3f}{int(r['pages_held_after']):>7}")  # fmt: skip
    bad = [r for r in rows if r["failed"] or r["pages_held_after"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
