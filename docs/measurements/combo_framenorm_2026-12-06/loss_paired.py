"""Held-out diffusion loss, paired per batch: frame_norm warm start vs latent warm start (same clips, refs, noise).
usage: loss_paired.py [same-draws]: with same-draws, the references of warmstart.effect_losses (it draws an
own-effect and an other-effect reference per row), else an own-effect reference per row alone (another draw)."""
import sys, numpy as np, torch
sys.path.insert(0, "/work/main")
from video2lora.backbones import Backbone
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training.data import stack_examples, step_seed
from video2lora.training.loss import batch_loss, prepare_backbone
torch.set_num_threads(1)
prep = "/work/runs/combo6k/train/prepared/2ffdb833d5dd737f"
data = PreparedData.load(prep, "heldout")
bb = Backbone.from_pretrained("/work/main/video2lora/assets/checkpoint/backbone", device="cpu", dtype=torch.float32)
models = {k: Video2LoRAModel.from_pretrained(p).eval() for k, p in [(n, f"/work/runs/{r}/{s}") for n, r, s in (
    ("latent_ws", "combo6k", "warmstart"), ("frame_norm_ws", "combofn", "warmstart"), ("latent_ckpt", "combo6k", "checkpoint"), ("frame_norm_ckpt", "combofn", "checkpoint"))]}
labels = data.effects
rng = np.random.default_rng(1234)
rows = sorted(rng.choice(len(labels), 200, replace=False).tolist())
own = []
for t in rows:
    own.append(int(rng.choice([k for k in range(len(labels)) if labels[k] == labels[t] and k != t])))
    if sys.argv[1:] == ["same-draws"]:
        rng.choice([k for k in range(len(labels)) if labels[k] != labels[t]])
res = {k: [] for k in models}; res["none"] = []
with torch.no_grad():
    for i in range(0, len(rows), 8):
        batch = stack_examples([data.example(t) for t in rows[i:i + 8]])
        for k in ["none", *models]:
            gen = torch.Generator().manual_seed(step_seed(1234, i, 0))
            m = models.get(k, models["latent_ws"])
            prepare_backbone(bb, m)
            loras = None if k == "none" else m.materialize(*m.predict(torch.stack([data.example(r)["latents"] for r in own[i:i + 8]])))
            res[k].append(float(batch_loss(m, bb, batch, gen, loras)))
res = {k: np.array(v) for k, v in res.items()}
for k, v in res.items(): print(k, round(v.mean(), 4))
for a, b in (("frame_norm_ws", "latent_ws"), ("frame_norm_ckpt", "latent_ckpt")):
    d = res[a] - res[b]; print(f"{a} - {b}: {d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f} (per batch, {len(d)} batches)")
