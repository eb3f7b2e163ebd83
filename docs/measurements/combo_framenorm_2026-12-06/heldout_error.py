"""Relative squared error of predicted held-out LoRAs against the composed tables, per slot (motion, look)."""
import json, sys, torch
from safetensors import safe_open
sys.path.insert(0, "/work/main")
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training import warmstart as ws
from video2lora.effects.world import effect_factors
torch.set_num_threads(1)
prep = "/work/runs/combo6k/train/prepared/2ffdb833d5dd737f"
for split in ("train", "heldout"):
    data = PreparedData.load(prep, split)
    rows = list(range(0, len(data.index), 3))
    for arg in sys.argv[1:]:
        run, ckpt = arg.split(":")
        with safe_open(f"{run}/warmstart/lora_tables.safetensors", "pt") as f:
            meta = f.metadata(); t = {k: f.get_tensor(k) for k in f.keys()}
        table = ws.LoRATable(json.loads(meta["groups"]), t["a_pred"], t["b_pred"], json.loads(meta["units"]), t["a_units"], t["b_units"], effect_factors)
        a_t, b_t = table.weights([data.effects[r] for r in rows])
        sa, sb = table.a_pred.std(), table.b_pred.std()
        m = Video2LoRAModel.from_pretrained(ckpt).eval()
        a, b = ws.predict_rows(m, data, rows)
        out = []
        for j in (0, 1):
            ea = ((a[:, :, j] - a_t[:, :, j]) ** 2).mean() / sa**2
            eb = ((b[..., j] - b_t[..., j]) ** 2).mean() / sb**2
            out.append(round(float((ea + eb) / 2), 3))
        # norm of predicted B (the LoRA's size) against the target's
        nb = [round(float(b[..., j].norm(dim=(1, 2)).mean() / b_t[..., j].norm(dim=(1, 2)).mean()), 3) for j in (0, 1)]
        print(split, ckpt.split("/runs/")[1], "rel. error motion/look", out, "B norm ratio motion/look", nb, flush=True)
