#!/bin/sh
# Regenerates paired.md from the row files (run in this folder).
M=..
echo "## Seed 303: the shipped checkpoint (two hypernetworks) minus the one shipped before, every method"
echo "(no_lora and per_effect_lora rows: the same method in two sessions, a check that the evaluation repeats)"
python $M/combo_backbone_2026-12-07/paired_runs.py seed_303_rows.json seed_303_one_hypernetwork_rows.json
echo; echo "## Seed 303: the shipped checkpoint's video2lora minus no LoRA (same rows)"
python $M/refine_2026-12-07/paired_methods.py seed_303_rows.json video2lora seed_303_rows.json no_lora
echo; echo "## Seed 303: the shipped checkpoint's video2lora minus the per-effect LoRAs"
python $M/refine_2026-12-07/paired_methods.py seed_303_rows.json video2lora seed_303_rows.json per_effect_lora
echo; echo "## Validation seed 101: the rerun with the cosine-decayed regression (step 500) minus the shipped checkpoint"
python $M/combo_backbone_2026-12-07/paired_runs.py validation_seed_101_rows.json $M/motion_stream_2026-12-07/validation_seed_101_step500_rows.json --method video2lora
echo; echo "## Test seed 202: the cosine rerun minus the shipped checkpoint, every method (no_lora, per_effect_lora: a repeat check)"
python $M/combo_backbone_2026-12-07/paired_runs.py test_seed_202_rows.json $M/motion_stream_2026-12-07/test_seed_202_rows.json
echo; echo "## Test seed 202: the cosine rerun minus the one-hypernetwork checkpoint shipped before"
python $M/combo_backbone_2026-12-07/paired_runs.py test_seed_202_rows.json $M/combo_backbone_2026-12-07/test_seed_202_step1000_rows.json --method video2lora
echo; echo "## Test seed 202: the cosine rerun's video2lora minus no LoRA"
python $M/refine_2026-12-07/paired_methods.py test_seed_202_rows.json video2lora test_seed_202_rows.json no_lora
echo; echo "## Validation seed 101: the constant-rate rerun (step 500) minus the shipped checkpoint"
python $M/combo_backbone_2026-12-07/paired_runs.py constant_rate_validation_seed_101_rows.json $M/motion_stream_2026-12-07/validation_seed_101_step500_rows.json --method video2lora
echo; echo "## Validation seed 101: the constant-rate rerun minus the cosine rerun (same tables)"
python $M/combo_backbone_2026-12-07/paired_runs.py constant_rate_validation_seed_101_rows.json validation_seed_101_rows.json --method video2lora
echo; echo "## Test seed 202: the constant-rate rerun minus the shipped checkpoint"
python $M/combo_backbone_2026-12-07/paired_runs.py constant_rate_test_seed_202_rows.json $M/motion_stream_2026-12-07/test_seed_202_rows.json --method video2lora
echo; echo "## Test seed 202: the constant-rate rerun minus the cosine rerun (same tables)"
python $M/combo_backbone_2026-12-07/paired_runs.py constant_rate_test_seed_202_rows.json test_seed_202_rows.json --method video2lora
echo; echo "## Test seed 202: the constant-rate rerun minus the one-hypernetwork checkpoint shipped before"
python $M/combo_backbone_2026-12-07/paired_runs.py constant_rate_test_seed_202_rows.json $M/combo_backbone_2026-12-07/test_seed_202_step1000_rows.json --method video2lora
echo; echo "## Test seed 202: the constant-rate rerun's video2lora minus no LoRA and minus the per-effect LoRAs"
python $M/refine_2026-12-07/paired_methods.py constant_rate_test_seed_202_rows.json video2lora constant_rate_test_seed_202_rows.json no_lora
python $M/refine_2026-12-07/paired_methods.py constant_rate_test_seed_202_rows.json video2lora constant_rate_test_seed_202_rows.json per_effect_lora
