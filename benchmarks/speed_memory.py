"""Speed and memory per KV policy against the reference decoder, prompt 1k..32k (issue 7).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/speed_memory.py     # CPU: table + PNG, under 20 minutes
    python benchmarks/speed_memory.py --shape llada-8b --device cuda    # GPU: triton, bfloat16

The same as ``maskkv bench`` (the code lives in maskkv_engine/benchmarks/ so the CLI works from an
installed package); this script only points the results at benchmarks/RESULTS.md and the PNG next to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from maskkv_engine.benchmarks.speed_memory import main

HERE = Path(__file__).parent

if __name__ == "__main__":
    main(
        sys.argv[1:],
        script="python benchmarks/speed_memory.py",
        default_results=HERE / "RESULTS.md",
        default_plot=HERE / "speed_memory.png",
    )
