"""Tables of the speed / memory benchmark (``speed_memory.py``): every figure with its ratio against ``none``
of the same prompt and gen length, the roofline per configuration, the extrapolation check and the headline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maskkv_engine.benchmarks import common

if TYPE_CHECKING:
    from maskkv_engine.benchmarks.speed_memory import Result


def none_kv_bytes(cfg, n: int, gen: int, elem: int) -> int:
    """``none`` has no pages: its only KV is one layer's K/V in flight during each full pass (computed)."""
    return 2 * (n + gen) * cfg.num_kv_heads * cfg.head_dim * elem


def by_key(results: list[Result]) -> dict[tuple, Result]:
    return {(r.gen, r.n, r.spec.label): r for r in results}


def speed_table(results: list[Result], gen: int, cfg, elem: int) -> list[str]:
    idx = by_key(results)
    rows = []
    for r in results:
        if r.gen != gen:
            continue
        if not r.ok:
            rows.append([str(r.n), r.spec.label, r.skipped or "—", "", "", "", "", "", ""])
            continue
        ref = idx.get((gen, r.n, "none"))
        ref = ref if ref is not None and ref.ok else None
        kv = none_kv_bytes(cfg, r.n, gen, elem) if r.spec.policy == "none" else r.run.kv_peak
        ref_kv = none_kv_bytes(cfg, r.n, gen, elem)
        star = "*" if r.extrapolated else ""
        cells = [
            (f"{r.run.prefill:.2f}", ratio_or_dash(r.run.prefill, ref and ref.run.prefill)),
            (f"{r.run.mean_step * 1e3:.1f}", ratio_or_dash(ref and ref.run.mean_step, r.run.mean_step)),
            (f"{r.e2e:.1f}{star}", ratio_or_dash(ref and ref.e2e, r.e2e)),
            (f"{r.tokens_per_second:.2f}", ratio_or_dash(r.tokens_per_second, ref and ref.tokens_per_second)),
            (common.mib(kv), ratio_or_dash(kv, ref_kv)),
            (common.mib(above(r)), ratio_or_dash(above(r), ref and above(ref))),
        ]
        rows.append([str(r.n), r.spec.label, *[f"{a} ({b})" for a, b in cells], common.mib(r.run.mem_peak)])
    head = [
        "prompt", "policy", "prefill s (x none)", "step ms (none / this)", "end-to-end s (none / this)",
        "tokens/s (x none)", "peak KV MiB (x none)", "peak memory above idle MiB (x none)", "peak memory MiB",
    ]  # fmt: skip
    return common.markdown_table(head, rows)


def above(r: Result) -> int:
    """Peak process memory above the idle process (model, engine) before the request: what the request adds."""
    return r.run.mem_peak - r.run.mem_idle


def ratio_or_dash(a, b) -> str:
    return common.ratio(a, b) if a and b else "—"


def roofline_table(results: list[Result], gen: int) -> list[str]:
    rows = []
    for r in results:
        if r.gen != gen or not r.ok or r.floor is None:
            continue
        f = r.floor
        measured = r.run.mean_step
        rows.append(
            [str(r.n), r.spec.label, f"{f.flops / 1e9:.2f}", common.mib(f.bytes), f"{f.seconds * 1e3:.2f} ({f.bound})",
             f"{measured * 1e3:.1f}", f"{measured / f.seconds:.1f}x"]
        )  # fmt: skip
    head = [
        "prompt",
        "policy",
        "step GFLOP",
        "step reads MiB",
        "floor ms (bound)",
        "measured step ms",
        "measured / floor",
    ]
    return common.markdown_table(head, rows)


def extrapolation_check(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.ok and r.extrapolation_check is not None:
            err = 100 * (r.extrapolation_check - r.e2e) / r.e2e
            lines.append(
                f"- none, prompt {r.n}, gen {r.gen}: measured {r.e2e:.1f} s, extrapolated from its first "
                f"{min(len(r.run.step_times), 3)} passes {r.extrapolation_check:.1f} s ({err:+.1f}%)"
            )
    return lines


def headline(results: list[Result]) -> list[str]:
    """MaskKV against none (speed) and full (peak memory) at the longest length measured, per gen."""
    idx = by_key(results)
    lines = []
    for gen in sorted({r.gen for r in results}):
        done = [r.n for r in results if r.gen == gen and r.ok and r.spec.label == "none"]
        if not done:
            continue
        n = max(done)
        none, full, dllm = (idx.get((gen, n, k)) for k in ("none", "full", "dllm-cache"))
        for label in ("maskkv-256", "maskkv-64"):
            m = idx.get((gen, n, label))
            if m is None or not m.ok:
                continue
            parts = [f"- gen {gen}, prompt {n}, {label}: {none.e2e / m.e2e:.1f}x faster end to end than none"]
            if none.extrapolated:
                parts.append(" (none extrapolated)")
            if dllm is not None and dllm.ok:
                parts.append(f", {dllm.e2e / m.e2e:.1f}x faster than dllm-cache")
            if full is not None and full.ok:
                kv = 100 * (1 - m.run.kv_peak / full.run.kv_peak)
                mem = 100 * (1 - m.run.mem_peak / full.run.mem_peak)
                mem_above = 100 * (1 - above(m) / above(full)) if above(full) > 0 else float("nan")
                parts.append(
                    f"; peak KV {kv:.0f}% below full; peak memory above the idle process {mem_above:.0f}% "
                    f"below full ({mem:.0f}% of the whole process, weights and runtime included)"
                )
            lines.append("".join(parts))
    return lines


def gpu_section(script: str) -> list[str]:
    return [
        f"Command (not run): `{script} --shape llada-8b --device cuda`  ",
        "Code path: device cuda, attention_backend triton, dtype bfloat16, peak memory from "
        "torch.cuda.max_memory_allocated, page pool sized to each request's reservation, roofline against a "
        "measured bf16 8192^3 matmul and a 2 GiB device copy.",
        "",
        "**Not measured**: no GPU was lent to this issue, so there are no GPU figures yet; the command writes them "
        "as their own section (`Speed and memory per policy (cuda, `llada-8b`)`).",
    ]
