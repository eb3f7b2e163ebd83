"""The reference fit (video2lora.refine.reference_fit, as the batch job measures it) of every reference of the
earlier evaluate runs listed in runs.json (compounds and burst; validation seed 101, test seed 202), joined to those
runs' rows: zero-shot (zs), refined 80 steps (k80), refined 160 steps (k160), no LoRA, per-effect LoRA.

    python docs/measurements/unfamiliar_2026-12-07/reference_fits.py   # writes reference_fits.json beside it
"""
import json, os, sys, time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)
from video2lora.config import GenerationConfig  # noqa: E402
from video2lora.generate import Video2LoRAGenerator  # noqa: E402
from video2lora.predict import encode_reference_list  # noqa: E402
from video2lora.video_io import read_video  # noqa: E402

torch.set_num_threads(1)
ckpt = os.path.join(REPO, "video2lora/assets/checkpoint")
backbone_uri = os.path.join(ckpt, "backbone")
defaults = json.load(open(os.path.join(backbone_uri, "generation_defaults.json")))
cfg = GenerationConfig(step_cache="none", **{k: v for k, v in defaults.items() if hasattr(GenerationConfig, k)})
gen = Video2LoRAGenerator.from_pretrained(backbone_uri, ckpt, cfg)
out = {}
for key, files in json.load(open(os.path.join(HERE, "runs.json"))).items():
    rows = {}
    for method_key, f in files.items():
        d = json.load(open(os.path.join(REPO, "docs/measurements", f)))
        for r in (d if isinstance(d, list) else d["rows"]):
            m = method_key if r["method"] == "video2lora" else r["method"]
            rows.setdefault(r["name"], {})[m] = r
    res, t0 = [], time.perf_counter()
    for name, rs in sorted(rows.items()):
        first = next(iter(rs.values()))  # the same reference (file rendered from the seed) in every run
        ref = read_video(first["reference_uri"], cfg.num_frames, cfg.height, cfg.width)
        ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # as the batch job ships it (uint8)
        latents = encode_reference_list(gen.backbone, [ref], 1)
        fit = gen.reference_fits_from_latents(gen.predict_loras([ref]), latents, [ref[:, 0]], [first["reference_prompt"]])[0]
        res.append({"name": name, "split": first["split"], "effect": first["effect"], "fit": fit,
                    **{m: {"ok": r["effect_ok"], "content": r["content"], "pred": r["pred_effect"]} for m, r in rs.items()}})
    out[key] = res
    print(key, len(res), f"{time.perf_counter() - t0:.0f}s", flush=True)
json.dump(out, open(os.path.join(HERE, "reference_fits.json"), "w"), indent=1)
