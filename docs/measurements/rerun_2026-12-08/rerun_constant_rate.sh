set -e
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/snap-rep
cd /work/snap-rep
date
python jobs/recipe.py --world combo --out /work/runs/combo-bb2 --backbone video2lora/assets/checkpoint/backbone \
  --classifier video2lora/assets/checkpoint/classifier --table-steps 6000 --only data,prepare,warmstart
date
mkdir -p /work/runs/combo-ms/train
ln -sfn /work/runs/combo-bb2/data /work/runs/combo-ms/data
ln -sfn /work/runs/combo-bb2/train/prepared /work/runs/combo-ms/train/prepared
python jobs/recipe.py --world combo --out /work/runs/combo-ms --backbone video2lora/assets/checkpoint/backbone \
  --classifier video2lora/assets/checkpoint/classifier --table-steps 6000 --train-steps 1000 \
  --motion-stream --tables-from /work/runs/combo-bb2/warmstart --only warmstart,train
date
echo TRAIN_DONE
