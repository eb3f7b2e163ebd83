#!/bin/bash
# step cache quality (the default magcache 0.3) on the checkpoint shipped 2026-12-06 night (step 2000)
set -e
cd /work/main
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
for S in 11 13 19; do
  python jobs/evaluate.py --seed $S --effects combo-eval --refs-per-effect 8 --no-per-effect --output /work/q/sq2/$S-none --step-cache none > /work/q/sq2/$S-none.log 2>&1
  python jobs/evaluate.py --seed $S --effects combo-eval --refs-per-effect 8 --no-per-effect --output /work/q/sq2/$S-mag0.3 --step-cache magcache --against /work/q/sq2/$S-none > /work/q/sq2/$S-mag0.3.log 2>&1
  echo "seed $S done $(date)"
done
