"""Whole-process memory of long prompts: none / full / maskkv-256, with and without query chunking (issue 17).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/long_prompt_memory.py            # 2k .. 32k (long)
    python benchmarks/long_prompt_memory.py --quick                                  # smoke test (seconds)

A random-weight LLaDA-layout model with many layers and a narrow MLP (`long-kv`: 48 layers, d_model 256,
2 heads of 128, MLP 256), so that the KV bytes of a token (2 x 48 x 256 x 4 B = 96 KiB) outweigh one
layer's activations of a token about 7:1 (about 13 d_model-sized vectors per token and layer): there, what a policy keeps, not the activations, decides the
memory. Each configuration runs one request in a fresh process (the first pass and a few denoise steps)
and reports the process's peak RSS above its idle RSS (after the model and the pool are built; the
peak is reset there through /proc/self/clear_refs). Then, with a fixed ``kv_memory_bytes`` pool, it
finds the longest prompt each configuration completes (lengths doubling up to the longest asked).

The pool of the first sweep is sized to hold full KV at the longest prompt, so nothing is refused there.
Where one run costs more than ~10 minutes on a 2-core CPU, the sweep trims: from ``trim_from`` tokens
(16k) ``none`` runs only with chunking, from twice that (32k) only ``full`` and ``maskkv`` with
chunking run (``none`` recomputes the whole prompt every step; an unchunked first pass is the same
work as a chunked one). The fixed-pool search (a small pool, prompts doubling from 256) skips the same,
and skips ``none`` (it keeps no KV: no pool bounds it). A run the pool search completed is not repeated
in the sweep: the pool's size does not change the process's peak (its pages are touched as they fill).
Results: a markdown table on stdout, JSON in ``--out``, a PNG of peak memory against prompt length with
``--plot``. ``--quick`` (tests/test_long_prompt_memory.py) runs a tiny shape in this process: it checks
that the script works, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SHAPES = {
    # name: (d_model, layers, heads, kv heads, mlp, vocab)
    "long-kv": (256, 48, 2, 2, 256, 4096),
    "tiny": (64, 8, 2, 2, 64, 512),
}
CONFIGS = (("none", None), ("full", None), ("maskkv", 256))


@dataclass
class Sweep:
    shape: str
    lengths: list[int]
    chunk: int
    gen: int
    steps: int
    budget: int
    fixed_pool: int
    pool_lengths: list[int]  # prompts tried, in order, against the fixed pool
    trim_from: int  # see the module docstring
    in_process: bool = False  # smoke test: no fresh process per run (the peaks then mean nothing)

    def configs_at(self, n: int) -> list[tuple[str, int | None, int]]:
        """(policy, budget, chunk) run at prompt length n."""
        runs = []
        for policy, budget in CONFIGS:
            budget = budget if budget is None else self.budget
            for chunk in (0, self.chunk):
                if n >= 2 * self.trim_from and (policy == "none" or not chunk):
                    continue
                if n >= self.trim_from and policy == "none" and not chunk:
                    continue
                runs.append((policy, budget, chunk))
        return runs


# 2 denoise steps: the first pass (where the peak is) and one step after it
FULL = Sweep("long-kv", [2048, 4096, 8192, 16384, 32768], 2048, 32, 2, 256, 40 << 20,
             [256 << i for i in range(8)], trim_from=16384)  # fmt: skip
QUICK = Sweep("tiny", [128, 256], 32, 8, 2, 16, 768 << 10, [128, 256], trim_from=1 << 30, in_process=True)


def kv_bytes_per_token(shape: str) -> int:
    d, layers, heads, kv_heads, _, _ = SHAPES[shape]
    return 2 * layers * kv_heads * (d // heads) * 4


def write_model(root: Path, shape: str, max_len: int, budget: int) -> Path:
    """config.json of the shape (weights: load_format='dummy') and a MaskKV profile from random prompts."""
    from maskkv_engine.benchmarks.common import calibrate_random, load_dummy
    from maskkv_engine.models.random_checkpoint import llada_config

    d, layers, heads, kv_heads, mlp, vocab = SHAPES[shape]
    path = root / shape
    path.mkdir(parents=True, exist_ok=True)
    cfg = llada_config(
        d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, mlp_hidden_size=mlp, vocab_size=vocab,
        max_sequence_length=max_len,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    import torch

    model, mcfg = load_dummy(path, torch.device("cpu"), "float32")
    calibrate_random(path, model, mcfg, num_prompts=2, prompt_len=min(512, 4 * budget), gen=32)
    return path


# ---- the measured process ------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    """One request in this process: its row."""
    import torch

    from maskkv_engine import LLM, SamplingParams

    torch.manual_seed(0)
    llm = LLM(
        args.model, kv_policy=args.policy, kv_budget=args.budget, device="cpu", dtype="float32",
        load_format="dummy", skip_tokenizer_init=True, kv_memory_bytes=args.pool,
        prefill_chunk_size=args.chunk or None, max_num_batched_tokens=max(16384, args.n + args.gen),
        max_model_len=args.n + args.gen,
    )  # fmt: skip
    ids = torch.randint(3, 4000 if args.n > 1000 else 500, (args.n,)).tolist()
    params = SamplingParams(gen_length=args.gen, steps=args.steps, block_length=args.gen, stop_at_eos=False)
    idle = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    start = time.perf_counter()
    error = None
    try:
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        error = out.error
    except Exception as e:  # a request the pool can never hold, an out-of-memory
        error = f"{type(e).__name__}: {e}"
    row = {
        "policy": args.policy, "budget": args.budget, "chunk": args.chunk, "n": args.n, "ok": error is None,
        "error": error, "seconds": round(time.perf_counter() - start, 2), "idle_rss": idle,
        "peak_above_idle": max(_peak_rss_bytes() - idle, 0),
    }  # fmt: skip
    return row


def measure(model: Path, policy: str, budget: int | None, chunk: int, n: int, sweep: Sweep, pool: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--model", str(model), "--policy", policy, "--n", str(n),
        "--chunk", str(chunk), "--gen", str(sweep.gen), "--steps", str(sweep.steps), "--pool", str(pool),
    ]  # fmt: skip
    if budget is not None:
        cmd += ["--budget", str(budget)]
    if sweep.in_process:
        return worker(_parser().parse_args(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"policy": policy, "budget": budget, "chunk": chunk, "n": n, "ok": False, "error": tail[0]}
    return json.loads(lines[-1])


def label(row: dict) -> str:
    name = row["policy"] + (f"-{row['budget']}" if row["budget"] else "")
    name += f" chunk {row['chunk']}" if row["chunk"] else " unchunked"
    return name + (f" ({row['variant']})" if row.get("variant") else "")  # rows of another code version


def run(sweep: Sweep, out: Path | None) -> dict:
    longest = max(sweep.lengths)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp), sweep.shape, longest + sweep.gen, sweep.budget)
        big_pool = int(kv_bytes_per_token(sweep.shape) * (longest + sweep.gen) * 1.25) + (64 << 20)
        limits, completed = {}, {}
        if sweep.pool_lengths:
            for policy, budget, chunk in sweep.configs_at(min(sweep.pool_lengths)):
                if policy == "none":
                    continue
                done, failure = 0, None
                for n in sweep.pool_lengths:
                    if (policy, budget, chunk) not in sweep.configs_at(n):
                        break
                    row = measure(model, policy, budget, chunk, n, sweep, sweep.fixed_pool)
                    print(f"  pool {label(row)} n={n}: {row}", file=sys.stderr, flush=True)
                    if not row["ok"]:
                        failure = row["error"]
                        break
                    done = n
                    completed[policy, budget, chunk, n] = row
                name = label({"policy": policy, "budget": budget, "chunk": chunk})
                limits[name] = {"longest": done, "first_failure": failure}
        rows = []
        for n in sweep.lengths:
            for policy, budget, chunk in sweep.configs_at(n):
                row = completed.get((policy, budget, chunk, n))
                rows.append(row or measure(model, policy, budget, chunk, n, sweep, big_pool))
                print(f"  {label(rows[-1])} n={n}: {rows[-1]}", file=sys.stderr, flush=True)
    result = {"shape": sweep.shape, "kv_bytes_per_token": kv_bytes_per_token(sweep.shape), "rows": rows,
              "fixed_pool": sweep.fixed_pool, "longest_completed": limits}  # fmt: skip
    print(report(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
    return result


def report(result: dict) -> str:
    mib = 1 << 20
    lines = [
        f"Shape `{result['shape']}`: KV {result['kv_bytes_per_token'] / 1024:.0f} KiB per token. "
        "Peak RSS above idle (MiB), one request (first pass + a few steps), fresh process each:",
        "",
        "| configuration | " + " | ".join(str(n) for n in sorted({r["n"] for r in result["rows"]})) + " |",
    ]
    lengths = sorted({r["n"] for r in result["rows"]})
    lines.append("|---|" + "---:|" * len(lengths))
    for name in dict.fromkeys(label(r) for r in result["rows"]):
        cells = []
        for n in lengths:
            row = next((r for r in result["rows"] if label(r) == name and r["n"] == n), None)
            cells.append("—" if row is None else f"{row['peak_above_idle'] / mib:.0f}" if row["ok"] else "failed")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Longest prompt completed with a {result['fixed_pool'] / mib:g} MiB KV pool:", ""]
    for name, limit in result["longest_completed"].items():
        why = f" (next: {limit['first_failure']})" if limit["first_failure"] else ""
        lines.append(f"- {name}: {limit['longest'] or 'none'}{why}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Peak memory above idle against prompt length, one line per configuration (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(label(r) for r in result["rows"]):
        points = sorted(
            (r["n"], r["peak_above_idle"] / (1 << 20)) for r in result["rows"] if label(r) == name and r["ok"]
        )
        style = "-" if "chunk " in name else ":"
        ax.plot(*zip(*points), style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("peak RSS above idle (MiB)")
    ax.set_title(f"Whole-process peak memory, one request (`{result['shape']}` shape, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny shape and short prompts (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default: 2048,...,32768)")
    p.add_argument("--pool-lengths", default=None,
                   help="comma-separated prompts tried against the fixed pool ('' skips the search)")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="PNG of peak memory against prompt length")
    p.add_argument("--replot", type=Path, default=None, help="draw --plot from this JSON result instead of running")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("model", str), ("policy", str), ("budget", int), ("n", int), ("chunk", int),
                       ("gen", int), ("steps", int), ("pool", int)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return 0
    sweep = QUICK if args.quick else FULL
    if args.lengths:
        sweep = dataclasses.replace(sweep, lengths=sorted(int(n) for n in args.lengths.split(",")))
    if args.pool_lengths is not None:
        sweep = dataclasses.replace(sweep, pool_lengths=[int(n) for n in args.pool_lengths.split(",") if n])
    result = run(sweep, args.out)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
