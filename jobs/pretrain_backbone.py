"""Pretrain a small backbone on the procedural effects world (VAE, then DiT + text encoder), then save it frozen.

    python jobs/pretrain_backbone.py --out outputs/effects/backbone --vae-steps 1500 --dit-steps 3000
    python jobs/pretrain_backbone.py --out /tmp/bb --device cuda --vae-steps 6000 --dit-steps 20000 --dit-batch 128

Writes a diffusers pipeline directory (what `--backbone` of every other job takes) with generation_defaults.json,
and pretrain_report.json next to its model_index.json: VAE reconstruction PSNR on fresh clips (per effect too),
the DiT's held-out diffusion loss before/after, the loss curves and timings. The captions never name the effect:
the backbone learns every effect as part of the distribution, unnamed. See docs/EFFECTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video2lora.presets import EFFECTS_GENERATION  # noqa: E402

REPORT_NAME = "pretrain_report.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/effects/backbone", help="output diffusers pipeline directory")
    p.add_argument("--preset", default="effects-cogvideox", help="video2lora.presets preset to start from")
    p.add_argument("--init", default=None,
                   help="continue from this pretrained backbone (path or URL) instead of random weights; with "
                        "--vae-steps 0 its VAE and scaling factor are kept")
    p.add_argument("--effects", default=None,
                   help="labels to render (video2lora.effects.world.resolve_effects): default the single effects and "
                        "the static class; 'combo-world' adds the motion+look compounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips-per-label", type=int, default=200, help="rendered clips per effect (and the static class)")
    p.add_argument("--eval-clips-per-label", type=int, default=8, help="fresh clips per label for PSNR / eval loss")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--dit-steps", type=int, default=3000)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--vae-minutes", type=float, default=None, help="stop VAE training after this many minutes")
    p.add_argument("--dit-minutes", type=float, default=None, help="stop DiT training after this many minutes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=EFFECTS_GENERATION["steps"], help="default denoising steps written for the backbone")
    p.add_argument("--guidance-scale", type=float, default=EFFECTS_GENERATION["guidance_scale"])
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--force", action="store_true", help="pretrain again even if --out holds a finished backbone")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    import torch

    from video2lora.effects.pretrain import pretrain, save_backbone

    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    report_path = os.path.join(a.out, REPORT_NAME)
    if os.path.exists(report_path) and os.path.exists(os.path.join(a.out, "model_index.json")) and not a.force:
        print(f"{a.out} already holds a pretrained backbone ({REPORT_NAME}); --force to redo")
        return 0
    start = time.perf_counter()
    if a.vae_steps <= 0 and not a.init:
        print("error: --vae-steps 0 keeps the VAE of --init; without --init the VAE must be trained", file=sys.stderr)
        return 2
    pipe, labels = None, None
    if a.effects:
        from video2lora.effects.world import resolve_effects

        try:
            labels = resolve_effects(a.effects)
        except ValueError as e:  # names the unknown label
            print(f"error: --effects: {e}", file=sys.stderr)
            return 2
    if a.init:
        from video2lora.backbones import Backbone

        pipe = Backbone.from_pretrained(a.init, device="cpu", dtype=torch.float32).pipe
    pipe, report = pretrain(
        a.preset, seed=a.seed, clips_per_label=a.clips_per_label, vae_steps=a.vae_steps, vae_batch=a.vae_batch,
        vae_lr=a.vae_lr, dit_steps=a.dit_steps, dit_batch=a.dit_batch, dit_lr=a.dit_lr, device=a.device, eval_clips_per_label=a.eval_clips_per_label,
        log_every=a.log_every, vae_time_budget_s=a.vae_minutes * 60 if a.vae_minutes else None,
        dit_time_budget_s=a.dit_minutes * 60 if a.dit_minutes else None, pipe=pipe, labels=labels,
    )
    gen = dict(EFFECTS_GENERATION, steps=a.steps, guidance_scale=a.guidance_scale)
    save_backbone(pipe, a.out, gen)
    report.update(args=vars(a), generation_defaults=gen, wall_s=time.perf_counter() - start)
    if a.init:
        report["started_from"] = a.init
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"pretrained backbone in {a.out}: VAE PSNR {report['vae_psnr']:.2f} dB, DiT held-out loss "
          f"{report['dit_eval_loss']:.4f} (untrained {report['dit_eval_loss_before']:.4f}), {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
