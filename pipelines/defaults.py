"""The embedded default: tiny built-in backbone, the bundled checkpoint and a bundled manifest of clips
(regenerated with `video2lora.effects.dataset.write_demo_manifest`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from video2lora.storage import default_cache_dir

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "video2lora" / "assets"
DEMO_MANIFEST = ASSETS / "demo" / "manifest.parquet"
BUNDLED_CHECKPOINT = ASSETS / "checkpoint"
DEFAULT_PRESET = "tiny-cogvideox"


def tiny_backbone(preset: str = DEFAULT_PRESET, seed: int = 0) -> str:
    """Build the tiny backbone once into the cache (seeded, so every machine gets the same weights).
    With a trained bundled checkpoint, its frozen backbone is bundled too and used instead."""
    bundled = BUNDLED_CHECKPOINT / "backbone"
    if (bundled / "model_index.json").exists():
        return str(bundled)
    from video2lora.presets import save_preset

    path = Path(default_cache_dir()) / f"{preset}-seed{seed}"
    if not (path / ".complete").exists():
        logger.info("building the tiny %s backbone in %s", preset, path)
        save_preset(preset, str(path), seed=seed)
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

    path = Path(default_cache_dir()) / f"untrained-checkpoint-seed{seed}"
    if not (path / "config.json").exists():
        logger.warning("no bundled trained checkpoint: using an untrained seeded hypernetwork (%s)", path)
        new_model_for(Backbone.from_pretrained(backbone_uri, device="cpu"), seed=seed).save_pretrained(str(path))
    return str(path)
