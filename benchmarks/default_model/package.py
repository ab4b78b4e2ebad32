"""Turn a trained checkpoint directory into the shipped asset: MaskKV profile and model card.

    python -m benchmarks.default_model.package benchmarks/out/default_model [--evaluate 50]

The profile is calibrated on suite prompts (all tasks, 1k tokens) from a seed the evaluation never
uses, so that the engine's layer-by-layer prefill eviction has the statistics of the prompts the
model serves. The model card restates the training command and the accuracy table of
``train_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.default_model.evaluate import SUMMARY_SEED, format_table, summary_accuracy
from benchmarks.default_model.model import load_checkpoint
from benchmarks.longctx import TASKS, generate_suite, load_tokenizer

CALIBRATION_SEED = 999  # evaluation uses SUMMARY_SEED (training summary) and 7 / 2026 (tests, quality benchmark)
CALIBRATION_LENGTH = 1024


def write_profile(model_dir: Path) -> Path:
    from maskkv_engine.kv.calibrate import calibrate

    tokenizer = load_tokenizer(str(model_dir))
    samples = generate_suite(list(TASKS), [CALIBRATION_LENGTH], 2, seed=CALIBRATION_SEED, tokenizer=tokenizer)
    calibrate(model_dir, prompts=[s.prompt_token_ids for s in samples], gen_length=8, out=model_dir)
    return model_dir / "maskkv_profile.json"


def learned_paragraph(acc: dict) -> str:
    """Which tasks the model answers (>= 90% at 1k and 2k), up to which length it answers the others
    (>= 90% from the shortest length on), which only partly, and which not at all."""
    tasks = sorted({t for t, _ in acc})
    lengths = sorted({int(n) for _, n in acc})

    def at(t, n):
        return acc.get((t, str(n)), 0.0)

    learned = [t for t in tasks if min(at(t, 1024), at(t, 2048)) >= 0.9]
    up_to = {}
    for t in tasks:
        reach = [n for i, n in enumerate(lengths) if all(at(t, m) >= 0.9 for m in lengths[: i + 1])]
        if t not in learned and reach:
            up_to[t] = reach[-1]
    partial = [t for t in tasks if t not in learned and t not in up_to and max(at(t, n) for n in lengths) >= 0.2]
    rest = [t for t in tasks if t not in learned and t not in up_to and t not in partial]
    parts = []
    if learned:
        parts.append(f"It answers {', '.join(learned)} (at least 90% at 1k and 2k tokens).")
    for t, n in up_to.items():
        longer = ", ".join(f"{100 * at(t, m):.0f}% at {m}" for m in lengths if m > n)
        parts.append(f"It answers {t} up to {n} tokens (at least 90%; {longer}).")
    if partial:
        parts.append(f"It answers part of {', '.join(partial)}.")
    if rest:
        parts.append(f"It does not learn {', '.join(rest)} (below 20% at every length).")
    return " ".join(parts)


def recipe_paragraph(a: dict) -> str:
    """The attention targets, the causal-then-bidirectional schedule and the dense batches, when the run used them."""
    if a.get("route_weight") or a.get("probe_weight"):
        return (
            "Training: LLaDA's SFT loss on the response only, bidirectional attention throughout, plus two "
            "training-only attention targets that name the key-match circuit, annealed linearly to zero at "
            f"{100 * max(a.get('route_until', 0), a.get('probe_until', 0)):.0f}% of the steps: the first block "
            "should read, at each record value, its key two tokens back and, at each masked answer slot, the "
            "question's key (`--route-weight`); head 0 of the last block should read, from each masked answer "
            "slot, the value of the record with the asked key (`--probe-weight`). With a unit-scale embedding "
            f"(`--embed-std {a.get('embed_std', 0.02)}`), lr {a['lr']:g} and weight decay "
            f"{a.get('weight_decay', 0.0):g}, so that a token's own embedding is not drowned by the blocks' outputs. "
            "Learning curves of this run and of the attempts before it: `benchmarks/default_model/curves/`."
        )
    if not a.get("causal_until") and not a.get("dense_share"):
        return "Training: LLaDA's SFT loss on the response only, bidirectional attention throughout."
    which = "dense" if a.get("causal_dense_only") else "all"
    off = a.get("causal_off") or a["causal_until"]
    return (
        f"Training: {which} batches use causal attention for the first {100 * a['causal_until']:.0f}% of the steps "
        f"(where a key-match circuit can form, as in the autoregressive models Dream was adapted from); the causal "
        f"share then falls linearly to zero at {100 * off:.0f}%, and the rest is LLaDA's bidirectional masked "
        f"diffusion only. {100 * a.get('dense_share', 0):.0f}% of the batches (until {100 * a.get('dense_until', 1):.0f}% "
        "of the steps) are dense key recall in the suite's needle format (repeated needles' values masked and "
        "predicted, suite questions inline); the others are the suite's tasks with LLaDA's SFT loss on the "
        "response. Learning curves of this run and of the attempts before it: `benchmarks/default_model/curves/`."
    )


def stages(summary: dict) -> list[dict]:
    """The training runs behind a checkpoint, first to last: a run started `--init-from` another
    checkpoint carries that checkpoint's summary as `init_summary`."""
    before = stages(summary["init_summary"]) if summary.get("init_summary") else []
    return before + [summary]


def stage_dir(out: str, i: int, n_stages: int) -> str:
    """Where stage i (0-based) of n writes: `OUT_stage{i + 1}`, the last one OUT itself."""
    return out if i == n_stages - 1 else f"{out}_stage{i + 1}"


def reproduce_commands(runs: list[dict], out: str = "benchmarks/out/default_model") -> list[str]:
    """One trainer command per run, each writing its own directory, each later run starting from the
    one before."""
    lines = []
    for i, run in enumerate(runs):
        a = dict(run["args"], out=stage_dir(out, i, len(runs)))
        if i:
            a["init_from"] = stage_dir(out, i - 1, len(runs))
        flags = " ".join(  # a store_true option is written bare when set, left out when not
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in a.items()
            if k != "out" and v is not None and v is not False
        )
        lines.append(f"python -m benchmarks.train_default_model --out {a['out']} {flags}")
    return lines


CHAIN_TARGETS = (
    "In variable_tracking's assignments `var L = R` the first block reads R at L, the answer slots after the "
    "first read the slot before, and the last block reads, from a slot, the variable assigned from that slot's "
    "query (the question's value, then each answer in turn), so the chain is decoded one link per step."
)


def later_stage(i: int, a: dict, steps: int) -> str:
    """One line for a stage started from the one before: what it trained on, how long, how."""
    tasks = a["task_curriculum"].split(",")[-1].split(":", 1)[1].split("+")
    mix = ", ".join(f"{t} x{tasks.count(t)}" for t in dict.fromkeys(tasks))
    from benchmarks.train_default_model import ramp_down  # the trainer imports this module: import late

    until = max(a.get("route_until", 0), a.get("probe_until", 0))
    end = ramp_down(1.0, a.get("extras_from", 0.0), until)  # a ramp longer than the stage is cut at its end
    anneal = f"annealed to zero at {100 * until:.0f}%" if until <= 1 else f"falling linearly to {end:g} at the end"
    return (
        f"Stage {i + 1}: from stage {i}'s checkpoint, {steps:,} steps of {mix}, prompt lengths "
        f"`{a['curriculum']}` (fraction of the steps: top length), lr {a['lr']:g}, the attention targets again, "
        f"{anneal}."
    )


def write_model_card(model_dir: Path) -> Path:
    summary = json.loads((model_dir / "train_summary.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    acc = {tuple(k.split("@")): v for k, v in summary["accuracy"].items()}
    lengths = sorted({int(n) for _, n in acc})
    table = format_table({(t, int(n)): v for (t, n), v in acc.items()}, lengths)
    runs = stages(summary)
    a = summary["args"]
    threads = a.get("threads", 1)
    where = "a GPU" if summary.get("device") == "a GPU" else f"{threads} CPU thread{'s' * (threads > 1)}"
    train_s = sum(r["train_seconds"] for r in runs)
    steps = " + ".join(f"{r['steps_done']:,}" for r in runs)
    in_stages = f" in {len(runs)} stages" if len(runs) > 1 else ""
    commands = "\n".join(f"    {c}" for c in reproduce_commands(runs))
    all_stages = "\nor all stages in turn: `python -m benchmarks.default_model.recipe`.\n" if len(runs) > 1 else ""
    recipe = recipe_paragraph(runs[0]["args"])
    if len(runs) > 1:
        recipe = f"Stage 1: {recipe}\n\n" + "\n".join(
            f"- {later_stage(i, r['args'], r['steps_done'])}" for i, r in enumerate(runs) if i
        )
    if any("variable_tracking" in r["args"].get("task_curriculum", "") for r in runs):
        recipe += "\n\n" + CHAIN_TARGETS
    card = f"""# maskkv-engine default model

A {summary["params"] / 1e6:.2f}M-parameter LLaDA (masked diffusion, bidirectional attention, RoPE) trained
from scratch on this repository's synthetic long-context suite (`benchmarks/longctx`), on {where}: {train_s / 60:.0f} minutes of training{in_stages} ({train_s:,} s, {steps} steps)
plus {summary["eval_seconds"] / 60:.0f} minutes of evaluation (`train_summary.json`). It exists so that the engine,
its tests and its benchmarks have a real model that needs its prompt: it is not a language model.

- Architecture: `LLaDAModelLM`, d_model {cfg["d_model"]}, {cfg["n_layers"]} layers, {cfg["n_heads"]} heads,
  MLP {cfg["mlp_hidden_size"]}, tied embeddings, max_sequence_length {cfg["max_sequence_length"]}; the released
  LLaDA checkpoint layout (`model.transformer.*`).
- Tokenizer: word-level (`tokenizers`), {cfg["vocab_size"]} tokens, chat template; `<|mdm_mask|>` is the mask.
- `maskkv_profile.json`: MaskKV calibration (layer importance, head prompt preference) over suite prompts of
  {CALIBRATION_LENGTH} tokens, seed {CALIBRATION_SEED}.

## Accuracy (full cache, exact answer, {a["eval_n"]} samples per cell, seed {SUMMARY_SEED})

{table}

{learned_paragraph(acc)}

{recipe}

## Reproduce

{commands}
    python -m benchmarks.default_model.package benchmarks/out/default_model
{all_stages}
The schedule is by steps (the same seed gives the same model); `--minutes {a["minutes"]:g}` only stops a run
that overruns, it is not the expected time. This run used `--device {a.get("device", "cpu")}` on
{summary.get("device", "the CPU")}; `--device cuda` runs the same schedule on a GPU.
"""
    (model_dir / "README.md").write_text(card)
    return model_dir / "README.md"


def reevaluate(model_dir: Path, n: int, lengths: str) -> dict:
    """Evaluate the checkpoint again as the trainer does and record it in train_summary.json, with the
    evaluation options, as if the run had evaluated so itself."""
    torch.set_num_threads(1)
    t0 = time.time()
    acc = summary_accuracy(
        load_checkpoint(model_dir), load_tokenizer(str(model_dir)), n, [int(x) for x in lengths.split(",")]
    )
    path = model_dir / "train_summary.json"
    summary = json.loads(path.read_text())
    summary["args"] |= {"eval_n": n, "eval_lengths": lengths}
    summary["eval_seconds"] = round(time.time() - t0)
    summary["accuracy"] = {f"{t}@{length}": a for (t, length), a in acc.items()}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--evaluate", type=int, default=0, help="first re-evaluate with this many samples per cell")
    p.add_argument("--eval-lengths", default="256,512,1024,2048")
    args = p.parse_args(argv)
    if args.evaluate:
        acc = reevaluate(args.model_dir, args.evaluate, args.eval_lengths)
        print(format_table(acc, [int(x) for x in args.eval_lengths.split(",")]))
    print("wrote", write_profile(args.model_dir))
    print("wrote", write_model_card(args.model_dir))


if __name__ == "__main__":
    main()
