"""The per-effect LoRA of a kind of effect the hypernetwork never saw (burst), trained exactly as the recipe's
baselines stage trains the evaluated compounds' (jobs/recipe.py stage_baselines: rank 4, at most 4000 steps,
batch 14, early-stopped on its own clips' validation loss), on the shipped backbone.

    python jobs/make_effects.py --out OUT/data --seed 0 --clips-per-effect 60 --effects burst
    python jobs/prepare.py --ray-address local --manifest OUT/data/clips.parquet \
        --backbone video2lora/assets/checkpoint/backbone --output OUT/prepared
    python docs/measurements/new_kind_2026-12-07/per_effect_lora.py OUT/prepared/<hash> OUT/baselines
"""
import json
import os
import sys

import torch

from video2lora.backbones import Backbone
from video2lora.effects.baselines import train_per_effect_loras
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData

prepared, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
data = PreparedData.load(prepared, split="all")
backbone = Backbone.from_pretrained("video2lora/assets/checkpoint/backbone", device="cpu")
targets = Video2LoRAModel.from_pretrained("video2lora/assets/checkpoint").config.lora.target_modules
model, report = train_per_effect_loras(backbone, data, effects=["burst"], target_modules=targets, rank=4,
                                       steps=4000, batch_size=14, seed=0, early_stopping=True)
os.makedirs(out, exist_ok=True)
model.save(os.path.join(out, "per_effect_loras.safetensors"))
with open(os.path.join(out, "per_effect_loras.safetensors.json"), "w") as f:
    json.dump({"rank": 4, "max_steps": 4000, **report}, f, indent=2)
