"""Weight-space screen: regress the hypernetwork onto the shipped run's factorised LoRA tables (as the warm start
does) and read held-out part accuracy. Variants: one stream (shipped), two streams (motion slot / look slot each
its own hypernetwork), two streams with the motion stream's reference augmented with look-like nuisances."""
import copy, json, math, sys, time
import torch, torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file
from safetensors import safe_open
from video2lora.config import Video2LoRAConfig
from video2lora.hypernet import HyperNetwork, Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training.warmstart import LoRATable, _compose, part_accuracy, regress_hypernet
from video2lora.effects.labels import effect_factors

variant, out = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
torch.set_num_threads(1)
torch.manual_seed(0)
WS = "/work/runs/combo-bb2/warmstart"
PREP = "/work/runs/combo-bb2/train/prepared/b99b466d146bd273"
config = Video2LoRAConfig.from_dict(json.load(open(f"{WS}/config.json")))
t = load_file(f"{WS}/lora_tables.safetensors")
with safe_open(f"{WS}/lora_tables.safetensors", "pt") as f:
    meta = f.metadata()
groups, units = json.loads(meta["groups"]), json.loads(meta["units"])
table = LoRATable(groups, t["a_pred"], t["b_pred"], units, t["a_units"], t["b_units"], effect_factors)


def augment(x):
    """(N, C, F, h, w) latents: per clip a random orthogonal channel mix (colour, invert), per frame a random blur
    and sometimes a 2x pixelation: what looks do, none of which moves content between positions."""
    n, c, f, h, w = x.shape
    q = torch.linalg.qr(torch.randn(n, c, c))[0]
    x = torch.einsum("nij,njfhw->nifhw", q, x)
    frames = x.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)
    sigma = torch.rand(n * f) * 1.2
    k = torch.arange(-1, 2).float()
    g = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    g = g / g.sum(1, keepdim=True)  # (nf, 3)
    pad = F.pad(frames, (1, 1, 1, 1), mode="replicate")
    rows = sum(g[:, i, None, None, None] * pad[:, :, i:i + h, :] for i in range(3))
    frames = sum(g[:, i, None, None, None] * rows[:, :, :, i:i + w] for i in range(3))
    pix = torch.rand(n * f) < 0.25
    if pix.any():
        frames[pix] = F.interpolate(F.avg_pool2d(frames[pix], 2), scale_factor=2, mode="nearest")
    return frames.reshape(n, f, c, h, w).permute(0, 2, 1, 3, 4)


class TwoStream(nn.Module):
    def __init__(self, config, augment_motion):
        super().__init__()
        half = copy.deepcopy(config)
        half.lora.rank = config.lora.rank // 2
        torch.manual_seed(0)
        self.motion, self.look = HyperNetwork(half), HyperNetwork(half)
        self.augment_motion = augment_motion

    @property
    def video_proj(self):
        return self.motion.video_proj

    def forward(self, latents):
        m_in = augment(latents) if (self.training and self.augment_motion) else latents
        am, bm = self.motion(m_in)
        al, bl = self.look(latents)
        return torch.cat([am, al], 2), torch.cat([bm, bl], 3)


if variant == "one-wide":  # one stream with as many parameters as the two (width 136: 1.38 M against 1.41 M)
    config.hyper.width = 136
model = Video2LoRAModel(config)
if variant.startswith("two"):
    model.hypernet = TwoStream(config, augment_motion=(variant == "two-aug"))
print(variant, "hypernetwork params", sum(p.numel() for p in model.hypernet.parameters()), flush=True)
train = PreparedData.load(PREP, "train")
held = PreparedData.load(PREP, "heldout")
t0 = time.perf_counter()
hist = regress_hypernet(model, train, table, steps=steps, batch_size=32, lr=1e-3, seed=0, log_every=250)
res = {"variant": variant, "steps": steps, "regress_s": time.perf_counter() - t0,
       "part_accuracy": {"train": part_accuracy(model, train, table), "heldout": part_accuracy(model, held, table)},
       "regression": hist}
print(json.dumps({k: v for k, v in res.items() if k != "regression"}), flush=True)
json.dump(res, open(out, "w"), indent=1, default=str)
model.save_pretrained(out.replace(".json", "_model"))
