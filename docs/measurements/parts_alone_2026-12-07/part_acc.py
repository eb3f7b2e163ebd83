"""Held-out part accuracy of a warm start (or of a later checkpoint, 3rd argument, against the warm start's parts): nearest fitted part in weight space per slot (warmstart.part_accuracy),
with and without the empty part ("none", all zero) among the candidates."""
import json, sys, torch
from safetensors import safe_open
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training.warmstart import predict_rows, _weight_rows
from video2lora.effects.world import effect_factors
torch.set_num_threads(1)
ws, prepared = sys.argv[1], sys.argv[2]
model_dir = sys.argv[3] if len(sys.argv) > 3 else ws
model = Video2LoRAModel.from_pretrained(model_dir)
with safe_open(f"{ws}/lora_tables.safetensors", "pt") as f:
    units = json.loads(f.metadata()["units"]); a_u, b_u = f.get_tensor("a_units"), f.get_tensor("b_units")
data = PreparedData.load(prepared, "heldout")
rows = list(range(len(data.index)))
a, b = predict_rows(model, data, rows)
sa, sb = a_u.std(), b_u.std()
for exclude in (False, True):
    keep = [i for i, u in enumerate(units) if not (exclude and u == "none")]
    cand = _weight_rows(a_u[keep], b_u[keep], sa, sb)
    acc = []
    for j in range(2):
        near = torch.cdist(_weight_rows(a[:, :, j:j+1], b[..., j:j+1], sa, sb), cand).argmin(1).tolist()
        acc.append(sum(units[keep[n]] == effect_factors(data.effects[r])[j] for n, r in zip(near, rows)) / len(rows))
    print(f"{model_dir}: without 'none' among candidates={exclude}: motion {acc[0]:.3f} look {acc[1]:.3f} ({len(rows)} clips)")
