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
