set -e
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/snap-rep
cd /work/snap-rep
date
python jobs/recipe.py --world combo --out /work/runs/combo-ms --backbone video2lora/assets/checkpoint/backbone \
  --classifier video2lora/assets/checkpoint/classifier --table-steps 6000 --train-steps 500 \
  --motion-stream --tables-from /work/runs/combo-bb2/warmstart --only train,select,evaluate
date
echo RUN_DONE
