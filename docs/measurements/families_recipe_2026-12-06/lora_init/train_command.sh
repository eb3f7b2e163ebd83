#!/bin/bash
# Budget-matched plain end-to-end run (no warm start, LoRA-style head init) on the family world's prepared clips.
set -ex
cd /work/main
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
R=/work/runs/families
O=/work/runs/lorainit
STEPS=${STEPS:-2600}
P=$(ls -d $R/train/prepared/*/ | head -1)
python jobs/train.py --ray-address local --manifest $R/data/clips.parquet --backbone $R/backbone \
  --storage-path $O/train --name lorainit --prepared $P --output $O/final \
  --model-config '{"hyper": {"width": 96, "num_heads": 4, "stem_channels": 32}, "lora": {"rank": 2}}' \
  --head-init lora --num-workers 2 --max-steps $STEPS --batch-size 4 --lr 1e-3 --grad-clip 1.0 \
  --mixed-precision fp32 --checkpoint-every $((STEPS / 2)) --keep-checkpoints 2 --log-every 50 \
  --cpus-per-worker 0.25 --data-cpus 0.1
echo TRAIN_DONE
