set -e
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/snap-rep2
cd /work/snap-rep2
date
mkdir -p /work/runs/combo-ms2/train /work/runs/combo-ms2/baselines
ln -sfn /work/runs/combo-bb2/data /work/runs/combo-ms2/data
ln -sfn /work/runs/combo-bb2/train/prepared /work/runs/combo-ms2/train/prepared
cp video2lora/assets/checkpoint/baselines/per_effect_loras.safetensors /work/runs/combo-ms2/baselines/
python jobs/recipe.py --world combo --out /work/runs/combo-ms2 --backbone video2lora/assets/checkpoint/backbone \
  --classifier video2lora/assets/checkpoint/classifier --table-steps 6000 --train-steps 500 \
  --motion-stream --tables-from /work/runs/combo-bb2/warmstart --only warmstart,train,select,evaluate
date
echo RUN_DONE
