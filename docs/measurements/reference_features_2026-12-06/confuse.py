import json, sys, collections
import torch
from safetensors import safe_open
sys.path.insert(0, "/work/main")
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training import warmstart as ws
from video2lora.effects.world import effect_factors
torch.set_num_threads(2)
prep = "/work/runs/combo6k/train/prepared/2ffdb833d5dd737f"
held = PreparedData.load(prep, "heldout")
with safe_open("/work/runs/combo6k/warmstart/lora_tables.safetensors", "pt") as f:
    meta = f.metadata(); t = {k: f.get_tensor(k) for k in f.keys()}
units = json.loads(meta["units"])
a_u, b_u = t["a_units"], t["b_units"]
sa, sb = a_u.std(), b_u.std()
U = ws._weight_rows(a_u, b_u, sa, sb)
for path in sys.argv[1:]:
    model = Video2LoRAModel.from_pretrained(path).eval()
    a, b = ws.predict_rows(model, held, list(range(len(held.index))))
    print("==", path)
    for slot in (0, 1):
        d = torch.cdist(ws._weight_rows(a[:, :, slot:slot+1], b[..., slot:slot+1], sa, sb), U)
        near = d.argmin(1).tolist()
        by = collections.defaultdict(collections.Counter)
        for r, n in zip(held.effects, near): by[r][units[n]] += 1
        for e in sorted(by): print(slot, e, by[e].most_common(3))
