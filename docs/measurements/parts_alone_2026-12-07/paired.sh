#!/bin/sh
# Regenerates paired.md from the row files (run in this folder).
M=..
echo "## Test seed 202, compounds: this run (step 500) minus the shipped checkpoint, video2lora rows"
python $M/combo_backbone_2026-12-07/paired_runs.py test_seed_202_rows.json $M/combo_backbone_2026-12-07/test_seed_202_step1000_rows.json --method video2lora
echo; echo "## Test seed 202, compounds: this run's video2lora minus no LoRA (same rows)"
python $M/refine_2026-12-07/paired_methods.py test_seed_202_rows.json video2lora test_seed_202_rows.json no_lora
echo; echo "## Test seed 202, compounds: this run's video2lora minus the per-effect LoRAs"
python $M/refine_2026-12-07/paired_methods.py test_seed_202_rows.json video2lora test_seed_202_rows.json per_effect_lora
echo; echo "## Validation seed 101: this run's step 500 (chosen) minus the shipped checkpoint (step 1000 of its run)"
python $M/combo_backbone_2026-12-07/paired_runs.py validation_seed_101_step500_rows.json shipped_validation_seed_101_rows.json --method video2lora
echo; echo "## Validation seed 101: this run's step 1000 minus the shipped checkpoint"
python $M/combo_backbone_2026-12-07/paired_runs.py validation_seed_101_step1000_rows.json shipped_validation_seed_101_rows.json --method video2lora
echo; echo "## Burst, test seed 202: video2lora minus no LoRA, this run"
python $M/refine_2026-12-07/paired_methods.py burst_test_seed_202_rows.json video2lora burst_test_seed_202_rows.json no_lora
echo; echo "## Burst, test seed 202: video2lora minus no LoRA, the shipped checkpoint"
python $M/refine_2026-12-07/paired_methods.py $M/new_kind_2026-12-07/test_seed_202_zero_shot_per_effect_no_lora.json video2lora $M/new_kind_2026-12-07/test_seed_202_zero_shot_per_effect_no_lora.json no_lora
echo; echo "## Diagnostic, validation seed 101: this run's step 500 with the motion slot scaled 1.4x at sampling, minus 1.0x (scale_eval.py)"
python $M/combo_backbone_2026-12-07/paired_runs.py motion_slot_x1.4_validation_seed_101_rows.json motion_slot_x1.0_validation_seed_101_rows.json --method video2lora
echo; echo "## Diagnostic: scale_eval.py at 1.0x minus the select stage's rows of the same checkpoint (the script reproduces the job)"
python $M/combo_backbone_2026-12-07/paired_runs.py motion_slot_x1.0_validation_seed_101_rows.json validation_seed_101_step500_rows.json --method video2lora
