"""Batch generation: one video per manifest row, on any Ray cluster (local by default).

    ray job submit -- python jobs/batch_generate.py s3://bucket/manifest.parquet --output s3://bucket/out \
        --backbone s3://bucket/CogVideoX-5b-I2V --checkpoint s3://bucket/video2lora --num-gen-actors 8 --gen-num-gpus 1

With no arguments it runs the embedded default: tiny built-in models and a bundled manifest of clips.
Running the same command again resumes: rows already done are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import defaults  # noqa: E402
from pipelines.batch import TooManyFailures, apply_backbone_defaults, run_batch_job  # noqa: E402
from pipelines.common import ManifestError, SetupError, hide_known_ray_notices, init_ray  # noqa: E402
from pipelines.config import (BatchJobConfig, add_refine_args, add_step_cost_args, refine_overrides,  # noqa: E402
                              step_cost_overrides)
from video2lora.backbones.step_cost import step_options  # noqa: E402
from video2lora.config import GenerationConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    c, g = BatchJobConfig(), GenerationConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", nargs="?", default=str(defaults.DEMO_MANIFEST), help="Parquet file or dir (local or s3://)")
    p.add_argument("--output", default=c.output, help="where videos and results.parquet go (local or s3://)")
    p.add_argument("--backbone", default="", help="diffusers pipeline dir of the frozen backbone (default: tiny built-in)")
    p.add_argument("--checkpoint", default="", help="trained Video2LoRA artifact dir (default: the bundled one)")
    p.add_argument("--export-loras", action="store_true", help="also write each row's LoRA as a diffusers LoRA file")
    p.add_argument("--redo-changed", action="store_true",
                   help="on a resume, make again the rows made earlier from another prompt, reference, setting, "
                        "checkpoint, backbone or step cache (without it the job stops and names them)")
    p.add_argument("--max-failures", type=float, default=c.max_failures,
                   help="exit non-zero once more rows failed than this count (>= 1) or fraction (< 1); -1: no limit")
    p.add_argument("--batch-size", type=int, default=c.batch_size, help="rows per generation call")
    p.add_argument("--hyper-batch-size", type=int, default=c.hyper_batch_size)
    p.add_argument("--num-hyper-actors", type=int, default=c.num_hyper_actors)
    p.add_argument("--num-gen-actors", type=int, default=c.num_gen_actors)
    p.add_argument("--gen-num-gpus", type=float, default=c.gen_num_gpus, help="GPUs per generation actor (1 on GPU nodes)")
    p.add_argument("--hyper-num-gpus", type=float, default=c.hyper_num_gpus)
    p.add_argument("--actor-num-cpus", type=float, default=c.actor_num_cpus)
    p.add_argument("--torch-threads", type=int, default=c.torch_threads,
                   help="torch threads per actor (0: Ray's default; on CPU nodes set it to the actor's CPU share)")
    p.add_argument("--num-frames", type=int, default=None, help=f"default per row (paper: {g.num_frames})")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (paper: {g.steps})")
    p.add_argument("--guidance-scale", type=float, default=None, help=f"CFG scale (paper: {g.guidance_scale})")
    p.add_argument("--lora-strength", type=float, default=g.lora_strength)
    p.add_argument("--seed", type=int, default=g.seed)
    add_step_cost_args(p)
    add_refine_args(p)
    p.add_argument("--ray-address", default=None, help="default: the cluster of `ray job submit`, else a local one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--gallery", action="store_true", help="also write OUTPUT/index.html, a page of previews per row")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> BatchJobConfig:
    backbone = a.backbone or defaults.tiny_backbone()
    checkpoint = a.checkpoint or defaults.default_checkpoint(backbone)
    g = GenerationConfig(lora_strength=a.lora_strength, seed=a.seed)
    for name in ("num_frames", "height", "width", "steps", "guidance_scale"):
        if getattr(a, name) is not None:
            setattr(g, name, getattr(a, name))
    g = dataclasses.replace(g, **step_cost_overrides(a), **refine_overrides(a))
    step_options(g)  # settings no cache can take fail here, before Ray starts
    cfg = BatchJobConfig(
        backbone=backbone, checkpoint=checkpoint, output=a.output, generation=g, batch_size=a.batch_size,
        hyper_batch_size=a.hyper_batch_size, num_hyper_actors=a.num_hyper_actors, num_gen_actors=a.num_gen_actors,
        hyper_num_gpus=a.hyper_num_gpus, gen_num_gpus=a.gen_num_gpus, actor_num_cpus=a.actor_num_cpus,
        max_failures=a.max_failures, export_loras=a.export_loras, redo_changed=a.redo_changed, torch_threads=a.torch_threads,
    )
    explicit = {k for k in ("num_frames", "height", "width", "steps", "guidance_scale") if getattr(a, k) is not None}
    return apply_backbone_defaults(cfg, explicit)  # explicit flags win over what the backbone dir suggests


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    a = parse_args(argv)
    hide_known_ray_notices()
    try:
        cfg = config_from_args(a)
    except ValueError as e:  # a bad step-cost setting: refused before Ray starts, naming the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.ray_address:  # else run_batch_job starts Ray itself, after the checkpoint is checked (a bad one: no Ray)
        init_ray(a.ray_address)
    try:
        summary = run_batch_job(a.manifest, cfg, progress=not a.quiet)
    except (ManifestError, SetupError) as e:  # a bad manifest, checkpoint or backbone: refused before any work
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TooManyFailures as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if a.gallery:
        from pipelines.gallery import write_gallery

        summary["gallery_uri"] = write_gallery(cfg.output)
    print(json.dumps(summary))
    print(f"done: {summary['ok']} made, {summary['skipped']} skipped, {summary['failed']} failed "
          f"in {summary['wall_s']:.1f}s ({summary['rows_per_s']:.2f} rows/s); "
          f"videos in {summary['videos_uri']}, results in {summary['results_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
