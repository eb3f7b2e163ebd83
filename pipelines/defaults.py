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
    import shutil

    from diffusers.utils import logging as diffusers_logging

    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for
    from video2lora.storage import content_hash, join, read_bytes

    # one cached untrained checkpoint per backbone shape (its DiT's and VAE's configs): another backbone must not
    # pick up one made for different layers
    shape = b"".join(read_bytes(join(backbone_uri, part, "config.json")) for part in ("transformer", "vae"))
    path = Path(default_cache_dir()) / f"untrained-checkpoint-{content_hash(shape)[:16]}-seed{seed}"
    # said on every run, not only when it is made: LoRAs from an untrained hypernetwork carry no effect
    logger.warning("no trained checkpoint for the backbone %s: using an untrained seeded hypernetwork (%s); give "
                   "--checkpoint for real effects", backbone_uri, path)
    if not (path / "config.json").exists():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        diffusers_logging.disable_progress_bar()  # the driver's console: our bar only
        try:
            new_model_for(Backbone.from_pretrained(backbone_uri, device="cpu"), seed=seed).save_pretrained(str(tmp))
        finally:
            diffusers_logging.enable_progress_bar()
        try:
            os.replace(tmp, path)  # atomic: a concurrent run sees no checkpoint or a whole one
        except OSError:  # another run made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
