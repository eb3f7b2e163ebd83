"""Diagnostic: the parts-alone checkpoint's LoRAs with the motion slot (rank slot 0) scaled by S at sampling, on the
validation seed's compound rows (evaluate.py's rows, video2lora only). Does undoing the held-out shrinkage bring
the held-out motion back?"""
import json, os, sys, time
import torch
from video2lora.config import GenerationConfig
from video2lora.effects import world as fx
from video2lora.effects.evaluation import build_rows, score
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.predict import PredictedLoRA
from video2lora.video_io import read_video, write_video

seed, out, ckpt, backbone_uri, classifier, scale = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])
torch.set_num_threads(1)
defaults = json.load(open(os.path.join(backbone_uri, "generation_defaults.json")))
cfg = GenerationConfig(step_cache="none", **{k: v for k, v in defaults.items() if hasattr(GenerationConfig, k)})
rows = build_rows(out, seed, fx.resolve_effects("combo-eval"), 8)
gen = Video2LoRAGenerator.from_pretrained(backbone_uri, ckpt, cfg)
os.makedirs(os.path.join(out, "gen", "videos"), exist_ok=True)
t0 = time.perf_counter()
for i in range(0, len(rows), 8):
    chunk = rows[i:i + 8]
    refs = [read_video(r["reference_uri"], cfg.num_frames, cfg.height, cfg.width) for r in chunk]
    loras = []
    for l in gen.predict_loras(refs):
        b = l.b_pred.clone()
        b[..., 0] *= scale  # the motion part's slot (factorised warm start: motion first)
        loras.append(PredictedLoRA(l.a_pred, b))
    with torch.no_grad():
        videos = gen.generate([GenerationRequest(r["prompt"], lora=l, negative_prompt="", seed=r["seed"]) for r, l in zip(chunk, loras)])
    for r, v in zip(chunk, videos):
        write_video(os.path.join(out, "gen", "videos", f"video2lora__{r['name']}.mp4"), v)
    print(i + len(chunk), f"{time.perf_counter() - t0:.0f}s", flush=True)
results = score(rows, out, classifier, ["video2lora"])
json.dump({"seed": seed, "scale": scale, "rows": results}, open(os.path.join(out, "results.json"), "w"), default=str, indent=1)
