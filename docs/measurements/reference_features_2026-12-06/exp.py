"""Regression-only experiment: held-out part accuracy of the warm-started hypernetwork for variants.
usage: exp.py NAME STEPS OVERRIDES_JSON AUG(0|1) [TABLES]"""
import json, sys, time, logging
import torch
from safetensors import safe_open
sys.path.insert(0, "/work/main")
from pipelines.train import model_config, parse_model_overrides
from video2lora.backbones import Backbone
from video2lora.generate import new_model_for
from video2lora.training import PreparedData
from video2lora.training import warmstart as ws
from video2lora.effects.world import effect_factors

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
name, steps, overrides, aug = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
tables = sys.argv[5] if len(sys.argv) > 5 else "/work/runs/combo6k/warmstart/lora_tables.safetensors"
torch.set_num_threads(1)
prep = "/work/runs/combo6k/train/prepared/2ffdb833d5dd737f"
data, held = PreparedData.load(prep, "train"), PreparedData.load(prep, "heldout")
with safe_open(tables, "pt") as f:
    meta = f.metadata(); t = {k: f.get_tensor(k) for k in f.keys()}
table = ws.LoRATable(json.loads(meta["groups"]), t["a_pred"], t["b_pred"], json.loads(meta["units"]), t["a_units"], t["b_units"], effect_factors)
backbone = Backbone.from_pretrained("/work/main/video2lora/assets/checkpoint/backbone", device="cpu", dtype=torch.float32)
base = {"hyper": {"width": 96, "num_heads": 4, "stem_channels": 32}, "lora": {"rank": 2}}
ov = json.loads(overrides)
for k, v in ov.items(): base.setdefault(k, {}).update(v)
import os
mode = os.environ.get("INPUT_MODE", "")
if mode:
    base["hyper"]["frame_differences"] = False
model = new_model_for(backbone, model_config(parse_model_overrides(json.dumps(base))), seed=0)
import torch.nn.functional as F
def frame_norm(x):  # per frame, per channel: standardise over space
    m = x.mean(dim=(-2, -1), keepdim=True); s = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return (x - m) / s
def cost_volume(x, r=2):  # normalised correlation of frame t with frame t-1 shifted by (dy, dx)
    v = F.normalize(frame_norm(x), dim=1)
    prev = F.pad(v[:, :, :-1], (r, r, r, r))
    cur = v[:, :, 1:]
    h, w = x.shape[-2:]
    out = [(cur * prev[..., r+dy:r+dy+h, r+dx:r+dx+w]).sum(1) for dy in range(-r, r+1) for dx in range(-r, r+1)]
    out = torch.stack(out, 1)
    return F.pad(out, (0, 0, 0, 0, 1, 0))
if mode:
    hn = model.hypernet
    c_in = {"norm": 8, "cost": 25, "normcost": 33}[mode]
    import torch.nn as nn
    torch.manual_seed(0)
    hn.stem[0] = nn.Conv3d(c_in, 32, 3, padding=1)
    orig = hn.video_tokens
    stem = hn.stem
    def feats(x):
        if mode == "norm": return frame_norm(x)
        if mode == "cost": return cost_volume(x)
        return torch.cat([frame_norm(x), cost_volume(x)], 1)
    hn.stem = nn.Identity()
    hn.add_module("stem2", stem)
    def vt(latents):
        return orig(hn.stem2(feats(latents)))
    hn.video_tokens = vt

if aug > 0:  # look jitter: per-sample, per-channel affine of the latent (same over frames); look slot loss off
    orig_predict = model.predict
    state = {"mask": None}
    g = torch.Generator().manual_seed(99)
    def predict(latents):
        if model.training:
            n, c = latents.shape[:2]
            on = (torch.rand(n, generator=g) < aug).float()
            scale = 1 + (torch.rand(n, c, generator=g) * 2 - 1) * 0.5
            sign = torch.where(torch.rand(n, c, generator=g) < 0.3, -1.0, 1.0)
            shift = torch.randn(n, c, generator=g) * 0.5 * latents.std()
            w = (scale * sign)[:, :, None, None, None]; s = shift[:, :, None, None, None]
            o = on[:, None, None, None, None]
            latents = o * (latents * w + s) + (1 - o) * latents
            state["mask"] = on
        return orig_predict(latents)
    model.predict = predict
    # masked loss: wrap regress loop's loss by monkeypatching the table target? simpler: own loop below
t0 = time.time()
if aug > 0:
    rows = ws._rows_by_group(data, table.groups)
    fit = [r for k, r in enumerate(rows) if k % 5]  # same split rule as regress_hypernet (every 5th held out)
    labels = table.index([data.effects[i] for i in fit])
    a_t, b_t = table.a_pred, table.b_pred; sa, sb = a_t.std(), b_t.std()
    params = list(model.hypernet.parameters()); opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.03)
    gg = torch.Generator().manual_seed(0); model.train()
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(fit), (32,), generator=gg)
        a, b = model.predict(ws.stacked_latents(data, [fit[i] for i in pick]))
        lab = labels[pick]
        ea = (a - a_t[lab]) ** 2 / sa**2; eb = (b - b_t[lab]) ** 2 / sb**2  # (B,L,r,down), (B,L,up,r)
        m = state["mask"]; keep = torch.stack([torch.ones_like(m), 1 - m], 1)  # slot 0 motion always, slot 1 look unless jittered
        la = (ea * keep[:, None, :, None]).sum() / (keep[:, None, :, None].expand_as(ea)).sum()
        lb = (eb * keep[:, None, None, :]).sum() / (keep[:, None, None, :].expand_as(eb)).sum()
        loss = (la + lb) / 2
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        if step % 250 == 0: logging.info("step %d loss %.4f", step, float(loss))
    model.eval()
else:
    ws.regress_hypernet(model, data, table, steps=steps, seed=0)
res = {"name": name, "steps": steps, "overrides": base, "aug": aug, "wall_s": time.time() - t0,
       "part_train": ws.part_accuracy(model, data, table), "part_heldout": ws.part_accuracy(model, held, table)}
print(json.dumps(res)); json.dump(res, open(f"/work/q/motion/{name}.json", "w"))
if not mode: model.save_pretrained(f"/work/q/motion/{name}")
