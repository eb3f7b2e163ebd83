"""Feasibility: the hypernetwork's LoRA, refined for K steps of the diffusion loss on its own reference clip
(A_pred, B_pred only; HyperDreamBooth's fast fine-tuning), then sampled. Validation-seed rows of evaluate.py."""
import json, os, sys, time
import torch
from video2lora.config import GenerationConfig
from video2lora.effects import world as fx
from video2lora.effects.evaluation import build_rows, score
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.predict import PredictedLoRA
from video2lora.training.loss import batch_loss, prepare_backbone, prompt_dropout
from video2lora.video_io import read_video, write_video

seed, out, ckpt, steps, lr, draws = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
split = sys.argv[7] if len(sys.argv) > 7 else ""
torch.set_num_threads(1)
backbone_uri = os.path.join(ckpt, "backbone")
defaults = json.load(open(os.path.join(backbone_uri, "generation_defaults.json")))
cfg = GenerationConfig(step_cache="none", **{k: v for k, v in defaults.items() if hasattr(GenerationConfig, k)})
rows = build_rows(out, seed, fx.resolve_effects("combo-eval"), 8)
if split:
    rows = [r for r in rows if r["split"] == split]
gen = Video2LoRAGenerator.from_pretrained(backbone_uri, ckpt, cfg)
bb, model = gen.backbone, gen.model
empty = bb.encode_prompts([""])[0].float()
os.makedirs(os.path.join(out, "gen", "videos"), exist_ok=True)
log, t0 = [], time.perf_counter()
for i in range(0, len(rows), 8):
    chunk = rows[i:i + 8]
    refs = [read_video(r["reference_uri"], cfg.num_frames, cfg.height, cfg.width) for r in chunk]
    init = gen.predict_loras(refs)
    a0, b0 = PredictedLoRA.stack(init)
    with torch.no_grad():
        lat = bb.encode_video(torch.stack(refs).to(bb.dtype), generator=None).float()
        emb = bb.encode_prompts([("" if os.environ.get("EMPTY_PROMPT") else r["reference_prompt"]) for r in chunk]).float()
    prepare_backbone(bb, model)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = torch.optim.Adam([a, b], lr=lr)
    n = len(chunk)
    idx = torch.arange(n).repeat(draws)
    losses = []
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(1000 * i + step)
        pe, _ = prompt_dropout(emb[idx], empty, 0.1, g)
        loss = batch_loss(model, bb, {"latents": lat[idx], "prompt_embeds": pe}, g, model.materialize(a[idx], b[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    rel = float((a.detach() - a0).norm() / a0.norm()), float((b.detach() - b0).norm() / b0.norm())
    loras = [PredictedLoRA(a[k].detach(), b[k].detach()) for k in range(n)]
    with torch.no_grad():
        videos = gen.generate([GenerationRequest(r["prompt"], lora=l, negative_prompt="", seed=r["seed"]) for r, l in zip(chunk, loras)])
    for r, v in zip(chunk, videos):
        write_video(os.path.join(out, "gen", "videos", f"video2lora__{r['name']}.mp4"), v)
    log.append({"rows": i + n, "first_loss": sum(losses[:5]) / 5, "last_loss": sum(losses[-5:]) / 5, "rel_change_a_b": rel,
                "time_s": time.perf_counter() - t0})
    print(log[-1], flush=True)
results = score(rows, out, os.path.join(ckpt, "classifier"), ["video2lora"])
json.dump({"seed": seed, "steps": steps, "lr": lr, "draws": draws, "log": log, "rows": results},
          open(os.path.join(out, "results.json"), "w"), default=str, indent=1)
