#!/bin/sh
# Regenerates paired.md from the row files (run in this folder).
M=..
echo "## Test seed 202: this run (step 500) minus the checkpoint shipped before, video2lora rows"
python $M/combo_backbone_2026-12-07/paired_runs.py test_seed_202_rows.json $M/combo_backbone_2026-12-07/test_seed_202_step1000_rows.json --method video2lora
echo; echo "## Test seed 202: this run's video2lora minus no LoRA (same rows)"
python $M/refine_2026-12-07/paired_methods.py test_seed_202_rows.json video2lora test_seed_202_rows.json no_lora
echo; echo "## Test seed 202: this run's video2lora minus the per-effect LoRAs"
python $M/refine_2026-12-07/paired_methods.py test_seed_202_rows.json video2lora test_seed_202_rows.json per_effect_lora
echo; echo "## Validation seed 101: this run's step 500 (chosen) minus the checkpoint shipped before"
python $M/combo_backbone_2026-12-07/paired_runs.py validation_seed_101_step500_rows.json $M/parts_alone_2026-12-07/shipped_validation_seed_101_rows.json --method video2lora
echo; echo "## Validation seed 101: this run's video2lora minus no LoRA"
python $M/refine_2026-12-07/paired_methods.py validation_seed_101_step500_rows.json video2lora validation_seed_101_step500_rows.json no_lora
echo; echo "## Burst (a kind never seen), test seed 202: this checkpoint's video2lora minus no LoRA"
python $M/refine_2026-12-07/paired_methods.py burst_test_seed_202_rows.json video2lora burst_test_seed_202_rows.json no_lora
