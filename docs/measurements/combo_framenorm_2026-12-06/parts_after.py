"""Held-out part accuracy (weight space) of trained checkpoints against their run's tables. usage: RUN:CKPT ..."""
import json, sys, torch
from safetensors import safe_open
sys.path.insert(0, "/work/main")
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training import warmstart as ws
from video2lora.effects.world import effect_factors
torch.set_num_threads(2)
prep = "/work/runs/combo6k/train/prepared/2ffdb833d5dd737f"
train, held = PreparedData.load(prep, "train"), PreparedData.load(prep, "heldout")
for arg in sys.argv[1:]:
    run, ckpt = arg.split(":")
    with safe_open(f"{run}/warmstart/lora_tables.safetensors", "pt") as f:
        meta = f.metadata(); t = {k: f.get_tensor(k) for k in f.keys()}
    table = ws.LoRATable(json.loads(meta["groups"]), t["a_pred"], t["b_pred"], json.loads(meta["units"]), t["a_units"], t["b_units"], effect_factors)
    m = Video2LoRAModel.from_pretrained(ckpt).eval()
    print(ckpt, "train", [round(x, 3) for x in ws.part_accuracy(m, train, table)], "held-out", [round(x, 3) for x in ws.part_accuracy(m, held, table)], flush=True)
