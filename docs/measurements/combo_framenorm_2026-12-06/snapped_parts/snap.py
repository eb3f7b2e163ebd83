"""Diagnostic: the warm start's part tables composed by the parts the hypernetwork *recognises* in the reference
(per rank slot, the fitted part nearest in weight space to its prediction: a hard "bank" head), against the same
warm-start hypernetwork's own LoRA, on the evaluation's rows (validation seed), same backbone, sampler and judge."""
import json, os, sys
import torch
sys.path.insert(0, "/work/main")
from safetensors.torch import load_file
from video2lora.config import GenerationConfig
from video2lora.effects import world as fx
from video2lora.effects.evaluation import build_rows, score, table
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.predict import PredictedLoRA
from video2lora.video_io import read_video, write_video

torch.set_num_threads(2)
seed, out = int(sys.argv[1]), sys.argv[2]
ASSETS = "/work/main/video2lora/assets/checkpoint"
WS = sys.argv[3] if len(sys.argv) > 3 else "/work/runs/combo/warmstart"
backbone = os.path.join(ASSETS, "backbone")
defaults = json.load(open(os.path.join(backbone, "generation_defaults.json")))
cfg = GenerationConfig(step_cache="none", **{k: v for k, v in defaults.items() if hasattr(GenerationConfig, k)})
rows = build_rows(out, seed, fx.resolve_effects("combo-eval"), 8)
tab = load_file(os.path.join(WS, "lora_tables.safetensors"))
groups = json.load(open(os.path.join(WS, "warmstart.json")))["groups"]
units = sorted({p for g in groups for p in fx.effect_factors(g)})
assert len(units) == tab["a_units"].shape[0], (units, tab["a_units"].shape)

gen = Video2LoRAGenerator.from_pretrained(backbone, WS, cfg)
a_u, b_u = tab["a_units"], tab["b_units"]
sa, sb = a_u.std(), b_u.std()
U = torch.cat([a_u.flatten(1) / sa, b_u.flatten(1) / sb], 1)

def snapped(video):
    lora = gen.predict_loras([video])[0]
    parts = []
    for j in range(2):
        row = torch.cat([lora.a_pred[:, j:j + 1].flatten()[None] / sa, lora.b_pred[..., j:j + 1].flatten()[None] / sb], 1)
        parts.append(int(torch.cdist(row.float(), U).argmin()))
    return PredictedLoRA(torch.cat([a_u[j] for j in parts], 1), torch.cat([b_u[j] for j in parts], 2)), "+".join(units[j] for j in parts)
os.makedirs(os.path.join(out, "gen", "videos"), exist_ok=True)
kinds = {}
for i in range(0, len(rows), 8):
    chunk = rows[i:i + 8]
    refs = [read_video(r["reference_uri"], cfg.num_frames, cfg.height, cfg.width) for r in chunk]
    ors = [snapped(x) for x in refs]
    for r, (_, kind) in zip(chunk, ors):
        kinds[r["name"]] = kind
    for method, reqs in (("snapped_table", [GenerationRequest(r["prompt"], lora=o, negative_prompt="", seed=r["seed"]) for r, (o, _) in zip(chunk, ors)]),
                         ("warmstart_hypernet", [GenerationRequest(r["prompt"], reference=x, negative_prompt="", seed=r["seed"]) for r, x in zip(chunk, refs)])):
        for r, v in zip(chunk, gen.generate(reqs)):
            write_video(os.path.join(out, "gen", "videos", f"{method}__{r['name']}.mp4"), v)
    print("rows", i + len(chunk), flush=True)
results = score(rows, out, os.path.join(ASSETS, "classifier"), ["snapped_table", "warmstart_hypernet"])
text, cells = table(results)
json.dump({"seed": seed, "kinds": kinds, "table": cells, "rows": results}, open(os.path.join(out, "results.json"), "w"), default=str, indent=1)
open(os.path.join(out, "table.md"), "w").write(text)
print(text)
