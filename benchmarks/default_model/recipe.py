"""The shipped default model's whole recipe: the trainer's stages, each starting from the one before.

    python -m benchmarks.default_model.recipe --out benchmarks/out/default_model [--device cuda]

Stage 1 (the trainer's defaults) forms the key-match circuit and answers single_needle and multi_key;
stage 2 adds variable_tracking's chains and trains mostly at 1k-2k tokens, where multi_key was weakest;
stage 3 trains the chains further at 1k-2k tokens, the attention targets on throughout (half weight at the end).
Stages 1-2 write `OUT_stage1`, `OUT_stage2`; the last writes OUT with its model card. Measured on one CPU
thread of the 2-core machine (another run beside it): 46 + 45 + 53 minutes of training (issue 20; curves 20,
25 and 33 in `benchmarks/default_model/curves/`).
"""

from __future__ import annotations

import argparse

from benchmarks import train_default_model
from benchmarks.default_model.package import stage_dir

STAGES: list[list[str]] = [
    [],  # the trainer's defaults
    [
        "--steps", "12000", "--lr", "1e-3", "--minutes", "150",
        "--task-curriculum", "0:variable_tracking+variable_tracking+multi_key+multi_key+multi_key+single_needle",
        "--curriculum", "0:256,0.1:512,0.2:1024,0.35:2048",
        "--probe-until", "0.8", "--route-until", "0.8",
        "--eval-n", "20", "--eval-lengths", "1024,2048",
    ],
    [
        "--steps", "12500", "--lr", "5e-4", "--minutes", "150",
        "--task-curriculum",
        "0:variable_tracking+variable_tracking+variable_tracking+multi_key+multi_key+single_needle",
        "--curriculum", "0:1024,0.15:2048",
        "--probe-until", "2.0", "--route-until", "2.0",
    ],
]  # fmt: skip


def stage_argv(i: int, out: str, device: str) -> list[str]:
    """Trainer arguments of stage i (0-based): its own output directory, the previous one as its start."""
    argv = ["--out", stage_dir(out, i, len(STAGES)), "--device", device, *STAGES[i]]
    return argv + (["--init-from", stage_dir(out, i - 1, len(STAGES))] if i else [])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/default_model")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when there is one)")
    p.add_argument(
        "--from-stage",
        type=int,
        default=1,
        choices=range(1, len(STAGES) + 1),
        help="skip the stages before (their outputs exist)",
    )
    args = p.parse_args(argv)
    for i in range(args.from_stage - 1, len(STAGES)):
        print(f"== stage {i + 1} of {len(STAGES)}", flush=True)
        train_default_model.main(stage_argv(i, args.out, args.device))


if __name__ == "__main__":
    main()
