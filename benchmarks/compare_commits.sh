#!/usr/bin/env bash
# Usage: git worktree add /tmp/before 854ab31 && BEFORE=/tmp/before AFTER=$PWD PYTHON=$PWD/.venv/bin/python bash benchmarks/compare_commits.sh
# The same short speed_memory and throughput runs on the commit before this round (854ab31) and on main,
# interleaved, same machine, same load: the refactor must be within noise or better.
export OMP_NUM_THREADS=1
for round in 1 2; do
for tree in "${BEFORE:-/tmp/before}" "${AFTER:-$PWD}"; do
  name=$(basename $tree)
  cd $tree
  cp benchmarks/RESULTS.md ${OUT:-/tmp}/res_$name.md
  echo "=== $name round $round speed_memory"
  PYTHONPATH=$tree nice -n 5 ${PYTHON:-python} benchmarks/speed_memory.py --shape cpu --lengths 1024,2048 --gen-lengths 32 --time-budget 240 --results ${OUT:-/tmp}/res_$name.md --plot ${OUT:-/tmp}/plot_$name.png 2>&1 | tail -14
  echo "=== $name round $round throughput"
  PYTHONPATH=$tree nice -n 5 ${PYTHON:-python} benchmarks/throughput.py --requests 16 --prompt 1024 --results ${OUT:-/tmp}/res_$name.md 2>&1 | tail -12
done
done
