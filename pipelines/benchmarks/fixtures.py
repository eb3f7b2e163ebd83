"""What the benchmark items measure on: seeded preset backbones, untrained checkpoints with a non-trivial head,
smooth reference clips, and batch-job manifests over them."""

from __future__ import annotations

import os

import torch

PRESETS = ("tiny", "small")  # benchmark names of video2lora.presets' tiny-cogvideox and small-cogvideox


def save_backbone(preset: str, directory: str, seed: int = 0) -> tuple[str, dict]:
    """Build a seeded preset as a diffusers pipeline directory; returns (directory, its generation settings). The
    settings run the paper's sampler exactly (no step cache): every item compares like with like against stock
    loops; item 8 measures the caches, the shipped default among them."""
    from video2lora.presets import get_preset, save_preset

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    name = f"{preset}-cogvideox"
    return save_preset(name, directory, seed=seed), {**get_preset(name).generation, "step_cache": "none"}


def save_checkpoint(backbone_dir: str, directory: str, seed: int = 0, head_std: float = 0.05) -> str:
    """A seeded untrained Video2LoRA model for a backbone, with a head large enough that every LoRA is non-trivial
    (an untrained head predicts near-zero LoRAs, which would hide nothing but look suspicious)."""
    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for

    model = new_model_for(Backbone.from_pretrained(backbone_dir, device="cpu"), seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.hypernet.head.weight.copy_(torch.randn(model.hypernet.head.weight.shape, generator=g) * head_std)
    model.save_pretrained(directory)
    return directory


def reference_clips(n: int, num_frames: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random clips (3, F, H, W) in [-1, 1]: low-frequency noise survives H.264 like real footage does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        coarse = torch.rand(1, 3, max(2, num_frames // 4), max(2, size // 8), max(2, size // 8), generator=g) * 2 - 1
        out.append(torch.nn.functional.interpolate(coarse, size=(num_frames, size, size), mode="trilinear")[0])
    return out


PROMPTS = ("a red circle on a black background", "a blue square moving slowly", "a green ring in the center",
           "a yellow star over a dark sky", "a small white box on a gray background", "a bird over the water")


def write_batch_manifest(directory: str, rows: int, distinct_references: int, num_frames: int, size: int,
                         seed: int = 0) -> tuple[str, list[dict]]:
    """Reference mp4s and a manifest of `rows` rows over `distinct_references` clips (so the reference cache has
    rows - distinct repeats to hit). Returns (manifest path, rows)."""
    import pandas as pd

    from video2lora.video_io import write_video

    os.makedirs(directory, exist_ok=True)
    clips = reference_clips(distinct_references, num_frames, size, seed=seed)
    names = []
    for i, clip in enumerate(clips):
        names.append(f"ref{i:03d}.mp4")
        write_video(os.path.join(directory, names[-1]), clip)
    table = [{"sample_id": f"row{i:04d}", "reference_uri": names[i % distinct_references],
              "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(rows)]
    path = os.path.join(directory, "manifest.parquet")
    pd.DataFrame(table).to_parquet(path, index=False)
    return path, table
