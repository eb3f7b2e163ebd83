"""Held-out clips: norm of each predicted rank-1 slot (|a| |b| per layer, summed) over the norm of the clip's own
fitted part (the warm start's table): below 1, the prediction is shrunk toward no LoRA in that slot."""
import json, sys, torch
from safetensors import safe_open
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training.warmstart import predict_rows
from video2lora.effects.world import effect_factors
torch.set_num_threads(1)
ws, prepared, model_dir, split = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
with safe_open(f"{ws}/lora_tables.safetensors", "pt") as f:
    units = json.loads(f.metadata()["units"]); a_u, b_u = f.get_tensor("a_units"), f.get_tensor("b_units")
data = PreparedData.load(prepared, split)
rows = list(range(len(data.index)))
a, b = predict_rows(Video2LoRAModel.from_pretrained(model_dir), data, rows)
norm = lambda A, B: (A.norm(dim=-1).squeeze(-1) * B.norm(dim=-2).squeeze(-1)).sum(-1)  # (N, L, 1, d), (N, L, u, 1)
out = []
for j in range(2):
    own = torch.tensor([units.index(effect_factors(data.effects[r])[j]) for r in rows])
    ratio = norm(a[:, :, j:j+1], b[..., j:j+1]) / norm(a_u[own], b_u[own]).clamp_min(1e-12)
    keep = torch.tensor([effect_factors(data.effects[r])[j] != "none" for r in rows])
    out.append(f"{['motion', 'look'][j]} {ratio[keep].median():.2f}")
print(f"{model_dir} ({split}): median predicted / own part norm: " + ", ".join(out))
