"""Prepare a training manifest once: decode every clip and encode it with the frozen VAE and text encoder.

    ray job submit -- python jobs/prepare.py --manifest s3://bucket/clips.parquet --backbone s3://bucket/CogVideoX-5b \
        --output s3://bucket/prepared --num-encoders 8 --encoder-num-gpus 1

Writes latents, prompt embeddings and first-frame latents as safetensors shards under <output>/<key>, where key is
a hash of the manifest content, the backbone and the clip size; running it again with the same inputs reuses them.
Bad clips are listed in errors.parquet with the reason. `jobs/train.py --prepared <output>` trains on the result.
With no arguments it prepares the embedded default (tiny built-in backbone, rendered effect clips).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="", help="training manifest, Parquet (local or s3://); default: demo clips")
    p.add_argument("--backbone", default="", help="diffusers pipeline dir of the frozen backbone; default: tiny built-in")
    p.add_argument("--output", default="outputs/prepared", help="root of prepared sets (local or s3://)")
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the backbone's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=32, help="clips per shard")
    p.add_argument("--encode-batch-size", type=int, default=2, help="clips per VAE call")
    p.add_argument("--num-encoders", type=int, default=1)
    p.add_argument("--encoder-num-gpus", type=float, default=0.0)
    p.add_argument("--encoder-num-cpus", type=float, default=0.5)
    p.add_argument("--force", action="store_true", help="prepare again even if an identical preparation exists")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo clips")
    p.add_argument("--ray-address", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    a = parse_args(argv)
    from pipelines import defaults
    from pipelines.common import ManifestError, init_ray
    from pipelines.prepare import prepare
    from video2lora.effects.dataset import demo_training_manifest

    manifest = a.manifest or demo_training_manifest(seed=a.seed)
    backbone = a.backbone or defaults.tiny_backbone()
    init_ray(a.ray_address)
    try:
        r = prepare(manifest, backbone, a.output, num_frames=a.num_frames, height=a.height, width=a.width,
                    shard_size=a.shard_size, encode_batch_size=a.encode_batch_size, num_encoders=a.num_encoders,
                    encoder_num_gpus=a.encoder_num_gpus, encoder_num_cpus=a.encoder_num_cpus, force=a.force)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(r)))
    print(f"{'reused' if r.skipped else 'prepared'} {r.num_ok} clips ({r.num_failed} failed) in {r.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
