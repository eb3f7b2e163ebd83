"""Render the procedural effects dataset (video2lora.effects) as mp4 clips + a Parquet manifest.

    python jobs/make_effects.py --out data/effects --seed 0 --clips-per-effect 60 --effects all
    python jobs/make_effects.py --out s3://bucket/effects-eval --seed 1 --clips-per-effect 20 --effects heldout

Writes <out>/clips/<clip_id>.mp4 (H.264, pixels from [-1, 1]) and <out>/clips.parquet with columns
clip_id, video_uri, prompt, effect, split, shape, colour, background. video_uri is relative to the manifest's
directory ("clips/<clip_id>.mp4") unless --absolute-uris is given. Prompts describe only the content, never the
effect; split is "train" for TRAIN_EFFECTS and "heldout" for HELDOUT_EFFECTS. The same seed gives the same data.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402

from video2lora import storage  # noqa: E402
from video2lora.effects import make_dataset, resolve_effects  # noqa: E402

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
) -> pd.DataFrame:
    """Render ``clips_per_effect`` clips per effect, write the mp4s and ``<out>/clips.parquet``.

    ``effects``: "train", "heldout", "all"/None, or a list of names.  Returns the manifest
    as a DataFrame (same content as the Parquet file).
    """
    import torch

    from video2lora.video_io import write_video

    if size % 2:
        raise ValueError(f"--size must be even for H.264, got {size}")
    if "://" not in out:
        out = os.path.abspath(out)
    names = resolve_effects(effects)
    records = make_dataset(seed, clips_per_effect, effects=names, num_frames=num_frames, size=size)
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/effects", help="output directory or URI (local or s3://)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips-per-effect", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="frame height and width (even)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--effects", default="all", help="train | heldout | all | combo | combo-train | combo-heldout | "
                   "combo-world | comma-separated effect names (compounds: motion+look)")
    p.add_argument("--absolute-uris", action="store_true", help="write absolute video_uri values")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    df = write_effects_dataset(
        a.out, a.seed, a.clips_per_effect, effects=a.effects, num_frames=a.frames, size=a.size, fps=a.fps,
        absolute_uris=a.absolute_uris, progress=True,
    )
    counts = df.groupby(["split", "effect"]).size()
    print(f"wrote {len(df)} clips to {storage.join(a.out, MANIFEST_NAME)}")
    print(counts.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
