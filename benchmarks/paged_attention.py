"""One denoise step's attention: MaskKV pages (256 prompt tokens per kv head on average) vs a full 8k prompt.

    OMP_NUM_THREADS=1 python benchmarks/paged_attention.py          # CPU: the torch backend
    python benchmarks/paged_attention.py --device cuda               # GPU: torch and triton, bandwidth
    python benchmarks/paged_attention.py --device cuda --batch 32    # enough programs to fill an H100

For each shape, one layer of attention for ``--batch`` sequences of ``--gen`` response queries over

    pages-256  each kv head keeps its own number of prompt tokens (mean 256), in pages (MaskKV)
    pages-8k   all 8192 prompt tokens of every head in pages (the ``full`` policy; same kernel)
    dense-8k   contiguous K/V of the whole prompt, torch SDPA: what a dense-cache decoder runs

plus, in every case, the step's own response K/V. "KV held" is the cache of one layer (pages, rounded
up to whole pages, or the dense prompt K/V); the response block is the same for all and not counted.
On a GPU the triton rows also give the bandwidth achieved (unique K/V bytes read / time) against a
device-to-device copy measured in the same run. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import AttentionMetadata
from maskkv_engine.attention.selector import get_attention_backend
from maskkv_engine.benchmarks.common import command_line, machine, write_results
from maskkv_engine.engine.block_manager import BlockManager

PAGE = 16  # CacheConfig.block_size default


@dataclass
class Shape:
    name: str
    n_q: int
    n_kv: int
    head_dim: int


SHAPES = {
    "8b": Shape("32q/8kv/d128", 32, 8, 128),  # Llama-3-8B-sized attention (GQA 4)
    "small": Shape("8q/2kv/d64", 8, 2, 64),  # a CPU-sized variant
}


@dataclass
class Row:
    shape: str
    variant: str  # pages-256 (pruned), pages-<prompt> (everything in pages), dense-<prompt> (SDPA)
    backend: str
    seconds: float
    kv_bytes: int  # cache held for one layer
    read_bytes: int  # unique K/V bytes one call reads (cache + response)
    prompt: int = 8192  # prompt tokens of the full / dense variants


def tokens_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def per_head_budgets(batch: int, n_kv: int, mean: int, seed: int = 0) -> torch.Tensor:
    """[batch, n_kv] kept tokens that differ per head (as MaskKV's do) and average ``mean``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(batch, n_kv).uniform_(0.25, 1.75, generator=g)
    return (w / w.mean() * mean).round().long().clamp(1, 8192)


def paged_step(shape: Shape, batch: int, gen: int, kept: torch.Tensor, dtype, device):
    """q/k/v of the response and metadata over pages written through the real BlockManager."""
    d = shape.head_dim
    bm = BlockManager(int((-(-kept // PAGE)).sum()), PAGE, 1, shape.n_kv, d, dtype, device)
    tables = []
    for s in range(batch):
        n = int(kept[s].max())
        rows = torch.randn(2, shape.n_kv, n, d, dtype=dtype, device=device)
        bm.reserve(f"s{s}", bm.pages_for(kept[s]))
        bm.store(f"s{s}", 0, rows[0], rows[1], kept[s])
        tables.append(bm.request_kv(f"s{s}").block_table())
    width = max(t.shape[-1] for t in tables)
    table = torch.stack([F.pad(t, (0, width - t.shape[-1])) for t in tables], dim=1)  # [1, S, H_kv, P]
    meta = AttentionMetadata.build(
        [gen] * batch, device, block_tables=table, cached_lens=kept[None], k_pool=bm.k_pool, v_pool=bm.v_pool
    )
    q = torch.randn(batch * gen, shape.n_q, d, dtype=dtype, device=device)
    k, v = torch.randn(2, batch * gen, shape.n_kv, d, dtype=dtype, device=device)
    elem = bm.k_pool.element_size()
    read = 2 * (int(kept.sum()) + batch * gen * shape.n_kv) * d * elem
    return (q, k, v, meta), bm.used_bytes, read


def dense_step(shape: Shape, batch: int, gen: int, prompt: int, dtype, device):
    """SDPA over contiguous [prompt + response] K/V: the dense-cache baseline."""
    d = shape.head_dim
    q = torch.randn(batch, shape.n_q, gen, d, dtype=dtype, device=device)
    k, v = torch.randn(2, batch, shape.n_kv, prompt + gen, d, dtype=dtype, device=device)
    elem = q.element_size()
    return (q, k, v), 2 * batch * shape.n_kv * prompt * d * elem, 2 * batch * shape.n_kv * (prompt + gen) * d * elem


def timed(fn: Callable[[], object], device: torch.device, min_seconds: float) -> float:
    """Median seconds per call. GPU: triton's do_bench (CUDA events, L2 flushed between calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(100, int(min_seconds * 1000)), return_mode="median") / 1e3
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a 1 GiB (default) device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), device, 1.0)


def run_shape(shape: Shape, args, backends: dict[str, AttentionBackend], device, dtype) -> list[Row]:
    rows = []
    full = tokens_label(args.prompt)
    budgets = {
        f"pages-{args.budget}": per_head_budgets(args.batch, shape.n_kv, args.budget),
        f"pages-{full}": torch.full((args.batch, shape.n_kv), args.prompt, dtype=torch.long),
    }
    for variant, kept in budgets.items():
        inputs, held, read = paged_step(shape, args.batch, args.gen, kept, dtype, device)
        for name, backend in backends.items():
            seconds = timed(lambda b=backend, x=inputs: b.forward(0, *x), device, args.min_seconds)
            rows.append(Row(shape.name, variant, name, seconds, held, read, args.prompt))
        del inputs
    (q, k, v), held, read = dense_step(shape, args.batch, args.gen, args.prompt, dtype, device)
    seconds = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), device, args.min_seconds)
    rows.append(Row(shape.name, f"dense-{full}", "sdpa", seconds, held, read, args.prompt))
    return rows


def table(rows: list[Row], copy_bw: float | None) -> list[str]:
    dense = {(r.shape, r.prompt): r.seconds for r in rows if r.variant.startswith("dense-")}
    head = "| shape | KV | backend | time (ms) | KV held / layer (MiB) | dense time / this |"
    if copy_bw:
        head += " K/V read (GB/s) | % of copy BW |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r.shape} | {r.variant} | {r.backend} | {r.seconds * 1e3:.3f} | {r.kv_bytes / 2**20:.2f} "
            f"| {dense[r.shape, r.prompt] / r.seconds:.1f}x |"
        )
        if copy_bw:
            bw = r.read_bytes / r.seconds
            line += f" {bw / 1e9:.0f} | {100 * bw / copy_bw:.0f}% |"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--shapes", default="8b,small", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--batch", type=int, default=1, help="sequences in the step")
    p.add_argument("--gen", type=int, default=32, help="response queries per sequence")
    p.add_argument("--prompt", type=int, default=8192, help="prompt tokens of the dense / full-cache baselines")
    p.add_argument("--budget", type=int, default=256, help="mean kept prompt tokens per kv head")
    p.add_argument("--min-seconds", type=float, default=2.0, help="time spent measuring each row")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    backends = {"torch": get_attention_backend("torch", device)}
    if device.type == "cuda":
        backends["triton"] = get_attention_backend("triton", device)
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None

    rows = [r for key in args.shapes.split(",") for r in run_shape(SHAPES[key], args, backends, device, dtype)]
    lines = table(rows, copy_bw)
    command = command_line("python benchmarks/paged_attention.py", argv)
    body = [
        f"Command: `{command}`  ",
        f"Machine: {machine(device)}  ",
        f"Date: {datetime.date.today().isoformat()}; dtype {str(dtype).removeprefix('torch.')}; batch {args.batch}, "
        f"{args.gen} response queries per sequence, page size {PAGE}, prompt {args.prompt}, "
        f"mean budget {args.budget} tokens per kv head. One layer; times are medians.",
    ]
    if copy_bw:
        body.append(f"Device-to-device copy bandwidth (1 GiB, read + write): {copy_bw / 1e9:.0f} GB/s.")
    body += ["", *lines]
    write_results(args.results, f"Paged attention, one denoise step ({device.type})", body)
    print(f"machine: {machine(device)}; wrote {args.results}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
