"""What measuring the fit costs beside the refinement it steers: per reference, the time of
`reference_fits_from_latents` (16 DiT forward passes) and of an 80-step refinement, one CPU thread, the shipped
checkpoint; references are the first N burst references of a seed-303 run's refs/ folder.

    python docs/measurements/unfamiliar_2026-12-07/fit_cost.py OUT/burst303/refs 8
"""
import dataclasses, json, os, sys, time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)
from video2lora.config import GenerationConfig  # noqa: E402
from video2lora.generate import Video2LoRAGenerator  # noqa: E402
from video2lora.predict import encode_reference_list  # noqa: E402
from video2lora.video_io import read_video  # noqa: E402

torch.set_num_threads(1)
refs_dir, n = sys.argv[1], int(sys.argv[2])
ckpt = os.path.join(REPO, "video2lora/assets/checkpoint")
defaults = json.load(open(os.path.join(ckpt, "backbone", "generation_defaults.json")))
cfg = GenerationConfig(step_cache="none", refine_steps=80, **{k: v for k, v in defaults.items() if hasattr(GenerationConfig, k)})
gen = Video2LoRAGenerator.from_pretrained(os.path.join(ckpt, "backbone"), ckpt, cfg)
fit_s, refine_s = [], []
for name in sorted(os.listdir(refs_dir))[:n]:
    ref = read_video(os.path.join(refs_dir, name), cfg.num_frames, cfg.height, cfg.width)
    lora, lat = gen.predict_loras([ref]), encode_reference_list(gen.backbone, [ref], 1)
    t0 = time.perf_counter()
    gen.reference_fits_from_latents(lora, lat, [ref[:, 0]], ["a caption"])
    t1 = time.perf_counter()
    gen.refine_loras_from_latents(lora, lat, [ref[:, 0]], ["a caption"])
    t2 = time.perf_counter()
    fit_s.append(t1 - t0), refine_s.append(t2 - t1)
fit_s, refine_s = sorted(fit_s), sorted(refine_s)
print(json.dumps({"references": n, "fit_s_median": fit_s[n // 2], "refine_80_s_median": refine_s[n // 2],
                  "fit_over_refine": sum(fit_s) / sum(refine_s)}, indent=1))
