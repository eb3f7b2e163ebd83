"""Render the procedural effects dataset (video2lora.effects.world) as mp4 clips + a Parquet manifest.

    python jobs/make_effects.py --out data/effects --seed 0 --clips-per-effect 60 --effects all
    python jobs/make_effects.py --out s3://bucket/effects-eval --seed 1 --clips-per-effect 20 --effects heldout

Writes <out>/clips/<clip_id>.mp4 (H.264, pixels from [-1, 1]) and <out>/clips.parquet with columns
clip_id, video_uri, prompt, effect, split, shape, colour, background. video_uri is relative to the manifest's
directory ("clips/<clip_id>.mp4") unless --absolute-uris is given. Prompts describe only the content, never the
effect; split is "heldout" for held-out effects (HELDOUT_EFFECTS, COMBO_HELDOUT, FAMILY_HELDOUT and any label of a
held-out family: `effect_split`), else "train" (and "train" for --train-labels). The same seed gives the same
data.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video2lora import storage  # noqa: E402
from video2lora.effects.dataset import MANIFEST_NAME, write_effects_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/effects", help="output directory or URI (local or s3://)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips-per-effect", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="frame height and width (even)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--effects", default="all", help="train | heldout | all | combo | combo-train | combo-heldout | "
                   "combo-world | families | families-world | ... (video2lora.effects.labels) | comma-separated effect "
                   "names (compounds: motion+look; family points: slide@45+hue@90)")
    p.add_argument("--train-labels", default="", help="labels of --effects (a set name or comma-separated) written "
                   "with split train although effect_split holds them out, e.g. --effects combo-with-parts "
                   "--train-labels combo-parts: the compounds' parts alone are training labels of the compound world")
    p.add_argument("--absolute-uris", action="store_true", help="write absolute video_uri values")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        df = write_effects_dataset(
            a.out, a.seed, a.clips_per_effect, effects=a.effects, num_frames=a.frames, size=a.size, fps=a.fps,
            absolute_uris=a.absolute_uris, progress=True, train_labels=a.train_labels,
        )
    except ValueError as e:  # an unknown effect, an odd size, a --train-labels label not in --effects
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = df.groupby(["split", "effect"]).size()
    print(f"wrote {len(df)} clips to {storage.join(a.out, MANIFEST_NAME)}")
    print(counts.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
