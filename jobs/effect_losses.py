"""Right- vs wrong-reference diffusion losses of trained Video2LoRA checkpoints, side by side.

    python jobs/effect_losses.py --prepared outputs/e2e-init/prepared/<key> --backbone video2lora/assets/checkpoint/backbone \
        --checkpoint tiny=outputs/e2e-init/tiny --checkpoint lora=outputs/e2e-init/lora   (docs/EFFECTS.md)

For every checkpoint and split of the preparation ("train": the effects it trained on, "heldout": effects it never
saw), `video2lora.training.warmstart.effect_losses` - the report of jobs/pretrain_hypernet.py - gives the clips'
diffusion loss (fixed timesteps and noise, the same for every checkpoint) with no LoRA, with the LoRA predicted from a
reference of the clip's own effect, and from a reference of another effect. own < other: the LoRA carries the
reference's effect; own = other: it ignores the reference; own < none: it helps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True, help="a complete preparation (the dir holding prepared.json)")
    p.add_argument("--backbone", required=True, help="the frozen backbone the preparation and checkpoints were made with")
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR",
                   help="a Video2LoRA artifact, named in the table (repeat for several)")
    p.add_argument("--splits", default="train,heldout", help="comma-separated manifest splits to report")
    p.add_argument("--eval-rows", type=int, default=120, help="clips per split (a fixed random subset)")
    p.add_argument("--seed", type=int, default=1234, help="timesteps, noise and reference draws")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output", default="", help="write the losses as JSON here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from video2lora.backbones import Backbone
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.storage import StorageError
    from video2lora.training import PreparedData
    from video2lora.training.warmstart import effect_losses, hypernet_weights

    if a.threads:
        torch.set_num_threads(a.threads)
    named = [c.split("=", 1) if "=" in c else (os.path.basename(c.rstrip("/")), c) for c in a.checkpoint]
    try:
        models = {name: Video2LoRAModel.from_pretrained(path) for name, path in named}
        data = {s: PreparedData.load(a.prepared, s) for s in a.splits.split(",") if s}
    except (OSError, ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backbone = Backbone.from_pretrained(a.backbone, device="cpu", dtype=torch.float32, components=("transformer",))
    results: dict = {}
    print("| checkpoint | split | clips | no LoRA | own-effect reference | other-effect reference | other - own (± SE) |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        model.eval()
        for split, d in data.items():
            if len(set(d.effects)) < 2:
                print(f"note: split {split!r} has fewer than 2 effects: skipped", file=sys.stderr)
                continue
            l = effect_losses(model, backbone, d, hypernet_weights(d, model), seed=a.seed, max_rows=a.eval_rows)
            results.setdefault(name, {})[split] = l
            clips = min(a.eval_rows or len(d.index), len(d.index))
            print(f"| {name} | {split} | {clips} | {l['none']:.4f} | {l['own_effect']:.4f} | {l['other_effect']:.4f} | "
                  f"{l['other_effect'] - l['own_effect']:+.4f} ± {l['margin_se']:.4f} |", flush=True)
    if a.output:
        from video2lora import storage

        storage.write_bytes_atomic(a.output, json.dumps({"losses": results, "args": vars(a)}, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
