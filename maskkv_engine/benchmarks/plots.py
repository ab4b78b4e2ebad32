"""PNG plots of the speed / memory benchmark (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path


def plot_speed_memory(results, out: Path, title: str) -> None:
    """One row per gen_length: end-to-end speedup over ``none``, peak KV, and peak process memory above the
    idle process, each against prompt length, one line per policy (hollow markers: none extrapolated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    gens = sorted({r.gen for r in results if r.ok})
    labels = list(dict.fromkeys(r.spec.label for r in results))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}  # the same colour for a policy in every panel
    tokens = FuncFormatter(lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}")
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    fig, axes = plt.subplots(len(gens), 3, figsize=(13, 3.6 * len(gens)), squeeze=False)
    for row, gen in zip(axes, gens):
        done = {(r.n, r.spec.label): r for r in results if r.gen == gen and r.ok}
        for label in labels:
            points = sorted((n, r) for (n, lab), r in done.items() if lab == label)
            if not points:
                continue
            xs = [n for n, _ in points]
            speed = [done[(n, "none")].e2e / r.e2e if (n, "none") in done else float("nan") for n, r in points]
            extrap = [(n, "none") in done and done[(n, "none")].extrapolated for n, _ in points]
            c = colors[label]
            row[0].plot(xs, speed, marker="o", color=c, label=label)
            hollow = [(x, s) for x, s, e in zip(xs, speed, extrap) if e]
            if hollow:
                row[0].plot(*zip(*hollow), "o", mfc="white", color=c)
            if label != "none":  # none keeps no pages
                row[1].plot(xs, [r.run.kv_peak / 2**20 for _, r in points], marker="o", color=c, label=label)
            above = [max(r.run.mem_peak - r.run.mem_idle, 1) / 2**20 for _, r in points]
            row[2].plot(xs, above, marker="o", color=c, label=label)
        row[0].set_ylabel(f"gen {gen}: speedup over none (end to end)")
        row[1].set_ylabel("peak KV (MiB)")
        row[2].set_ylabel("peak memory above idle (MiB)")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(tokens)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("prompt tokens")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: hollow = none extrapolated", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
