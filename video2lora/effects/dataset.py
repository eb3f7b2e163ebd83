"""Effects-world clips written as mp4 + a Parquet training manifest (what `jobs/make_effects.py`, the embedded
training demo and the bundled batch demo use)."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch

from .. import storage
from ..video_io import write_video
from .world import TRAIN_EFFECTS, effect_slug, make_dataset, resolve_effects

logger = logging.getLogger(__name__)

MANIFEST_NAME = "clips.parquet"
COLUMNS = ["clip_id", "video_uri", "prompt", "effect", "split", "shape", "colour", "background"]


def write_effects_dataset(
    out: str,
    seed: int = 0,
    clips_per_effect: int = 4,
    effects: str | list[str] | None = "all",
    num_frames: int = 9,
    size: int = 32,
    fps: float = 8,
    absolute_uris: bool = False,
    progress: bool = False,
    train_labels: str | Iterable[str] = (),
) -> pd.DataFrame:
    """Render ``clips_per_effect`` clips per effect, write the mp4s and ``<out>/clips.parquet``.

    ``effects``: "train", "heldout", "all"/None, or a list of names; ``train_labels`` (a set name or list) are
    written with split "train" whatever `effect_split` says.  Returns the manifest as a DataFrame (same content
    as the Parquet file).
    """
    if size % 2:
        raise ValueError(f"--size must be even for H.264, got {size}")
    if "://" not in out:
        out = os.path.abspath(out)
    names = resolve_effects(effects)
    records = make_dataset(seed, clips_per_effect, effects=names, num_frames=num_frames, size=size,
                           train_labels=train_labels)
    it = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="writing clips", unit="clip")
    rows = []
    for rec in it:
        rel = f"clips/{rec['clip_id']}.mp4"
        uri = storage.join(out, "clips", f"{rec['clip_id']}.mp4")
        write_video(uri, torch.from_numpy(rec["video"]), fps=fps)
        rows.append({**{k: rec[k] for k in COLUMNS if k in rec}, "video_uri": uri if absolute_uris else rel})
    df = pd.DataFrame(rows, columns=COLUMNS)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes_atomic(storage.join(out, MANIFEST_NAME), buf.getvalue())
    return df


def write_training_clips(directory: str, seed: int = 0, clips_per_effect: int = 4, effects=None,
                         num_frames: int = 9, size: int = 32) -> str:
    """A small training set (default: the first four training effects); returns the manifest's path."""
    effects = list(effects) if effects is not None else list(TRAIN_EFFECTS[:4])
    write_effects_dataset(directory, seed, clips_per_effect, effects=effects, num_frames=num_frames, size=size)
    return storage.join(os.path.abspath(directory) if "://" not in directory else directory, MANIFEST_NAME)


def demo_training_manifest(seed: int = 0, clips_per_effect: int = 4) -> str:
    """The embedded default's training set, rendered once into the cache."""
    directory = Path(storage.default_cache_dir()) / f"train-demo-seed{seed}-n{clips_per_effect}"
    manifest = directory / MANIFEST_NAME
    if not (directory / ".complete").exists() or not manifest.exists():
        write_effects_dataset(str(directory), seed=seed, clips_per_effect=clips_per_effect, effects="train")
        (directory / ".complete").touch()
    return str(manifest)


def write_demo_manifest(directory: Path, seed: int = 1234) -> Path:
    """Regenerate the bundled batch demo: a few procedural effect clips and prompts that do not name the effect.

    Compound effects of the shipped checkpoint (docs/EFFECTS.md): three seen in its training, three held out."""
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
