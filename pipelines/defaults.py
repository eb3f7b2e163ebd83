"""The embedded default: tiny built-in backbone, the bundled checkpoint and a bundled manifest of clips."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "video2lora" / "assets"
DEMO_MANIFEST = ASSETS / "demo" / "manifest.parquet"
BUNDLED_CHECKPOINT = ASSETS / "checkpoint"
DEFAULT_PRESET = "tiny-cogvideox"


def cache_dir() -> Path:
    return Path(os.environ.get("VIDEO2LORA_CACHE", Path.home() / ".cache" / "video2lora"))


def tiny_backbone(preset: str = DEFAULT_PRESET, seed: int = 0) -> str:
    """Build the tiny backbone once into the cache (seeded, so every machine gets the same weights).
    With a trained bundled checkpoint, its frozen backbone is bundled too and used instead."""
    bundled = BUNDLED_CHECKPOINT / "backbone"
    if (bundled / "model_index.json").exists():
        return str(bundled)
    from video2lora.tiny import save_tiny

    path = cache_dir() / f"{preset}-seed{seed}"
    if not (path / ".complete").exists():
        logger.info("building the tiny %s backbone in %s", preset, path)
        save_tiny(preset, str(path), seed=seed)
        (path / ".complete").touch()
    return str(path)


def default_checkpoint(backbone_uri: str, seed: int = 0) -> str:
    """The bundled trained checkpoint if present, else a seeded untrained one for the tiny backbone."""
    bundled_backbone = BUNDLED_CHECKPOINT / "backbone"
    if (BUNDLED_CHECKPOINT / "config.json").exists() and (
        not (bundled_backbone / "model_index.json").exists()
        or os.path.abspath(str(backbone_uri)).rstrip("/") == str(bundled_backbone)
    ):  # the bundled checkpoint was trained for the bundled backbone: another backbone gets a seeded untrained one
        return str(BUNDLED_CHECKPOINT)
    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for

    path = cache_dir() / f"untrained-checkpoint-seed{seed}"
    if not (path / "config.json").exists():
        logger.warning("no bundled trained checkpoint: using an untrained seeded hypernetwork (%s)", path)
        new_model_for(Backbone.from_pretrained(backbone_uri, device="cpu"), seed=seed).save_pretrained(str(path))
    return str(path)


def write_demo_manifest(directory: Path = DEMO_MANIFEST.parent, seed: int = 1234) -> Path:
    """Regenerate the bundled demo: a few procedural effect clips and prompts that do not name the effect.

    Compound effects of the shipped checkpoint (docs/EFFECTS.md): three seen in its training, three held out."""
    import pandas as pd

    from video2lora.effects import effect_slug, make_dataset
    from video2lora.video_io import write_video

    import torch

    directory.mkdir(parents=True, exist_ok=True)
    effects = ["zoom_out+invert", "zoom_in+fade_out", "spin+pixelate",  # seen
               "zoom_out+pixelate", "slide_left+blur_in", "melt_down+fade_out"]  # held out
    clips = make_dataset(seed, 1, effects=effects)
    prompts = ["a red circle on a black background", "a blue square on a gray background",
               "a yellow triangle on a dark blue background"]
    rows = []
    for clip in clips:
        effect = effect_slug(clip["effect"])  # sample ids and file names: [A-Za-z0-9._-]
        name = f"ref_{effect}.mp4"
        write_video(str(directory / name), torch.from_numpy(clip["video"]))
        for j, prompt in enumerate(prompts[:2]):
            rows.append({"sample_id": f"{effect}_{j}", "reference_uri": name, "prompt": prompt, "seed": j})
    pd.DataFrame(rows).to_parquet(directory / "manifest.parquet", index=False)
    return directory / "manifest.parquet"
