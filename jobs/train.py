"""Train the Video2LoRA hypernetwork + aux matrices on Ray Train with DeepSpeed ZeRO-2.

    ray job submit -- python jobs/train.py --manifest s3://bucket/clips.parquet --backbone s3://bucket/CogVideoX-5b \
        --storage-path s3://bucket/train-runs --output s3://bucket/video2lora --num-workers 8 --use-gpu

The manifest (Parquet: clip_id, video_uri, prompt, effect, optional image_uri, split) is prepared once
(decode + frozen VAE/text encoder, cached by content hash under --prepared), then N workers train on the
prepared shards. Checkpoints go to <storage-path>/<name>; running the same command again resumes from the
latest one. The final artifact (safetensors + config.json) is what `jobs/batch_generate.py --checkpoint` loads.
With no arguments it runs the embedded default: a tiny built-in backbone and rendered effect clips, 2 CPU workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video2lora.config import HEAD_INITS, HyperConfig, TrainConfig  # noqa: E402

DEMO_MAX_STEPS = 40


def parse_args(argv=None) -> argparse.Namespace:
    t = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="", help="training manifest, Parquet (local or s3://); default: demo clips")
    p.add_argument("--backbone", default="", help="diffusers pipeline dir of the frozen backbone; default: tiny built-in")
    p.add_argument("--storage-path", default="outputs/train", help="Ray Train storage for checkpoints + metrics (local or s3://)")
    p.add_argument("--output", default="", help="final artifact dir; default: <storage-path>/<name>/model")
    p.add_argument("--num-workers", type=int, default=2, help="training workers (one GPU each with --use-gpu)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL; else CPU workers over gloo")
    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default {t.max_steps}; demo {DEMO_MAX_STEPS})")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="clips per worker per step")
    p.add_argument("--checkpoint-every", type=int, default=None, help=f"steps between checkpoints (default {t.checkpoint_every}; demo 10)")
    p.add_argument("--keep-checkpoints", type=int, default=t.keep_checkpoints, help="newest checkpoints kept")
    p.add_argument("--lr", type=float, default=t.lr, help="AdamW learning rate (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--grad-clip", type=float, default=t.grad_clip, help="max gradient norm")
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    p.add_argument("--prompt-dropout", type=float, default=t.prompt_dropout, help="classifier-free prompt dropout")
    p.add_argument("--mixed-precision", choices=["bf16", "fp32"], default=t.mixed_precision)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="recompute the frozen DiT blocks in backward (auto: on above 1 B DiT parameters)")
    p.add_argument("--name", default="video2lora-train", help="run name: the same name + storage path resumes")
    p.add_argument("--prepared", default="", help="a prepared dir, or a root to prepare into (default <storage-path>/prepared)")
    p.add_argument("--split", default="train", help="manifest split to train on ('all' for every row)")
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the backbone's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-encoders", type=int, default=1, help="preparation encoder actors")
    p.add_argument("--encoder-num-gpus", type=float, default=None, help="GPUs per encoder actor (default 1 with --use-gpu)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default 1 with --use-gpu, else 0.5")
    p.add_argument("--data-cpus", type=float, default=0.25, help="CPUs of each worker's Ray Data reader")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts after crashes")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    p.add_argument("--report-every", type=int, default=5,
                   help="loss, lr, grad norm, samples/s to Ray Train every N steps (the dashboard's live curve)")
    p.add_argument("--model-config", default="", help='JSON overrides, e.g. \'{"lora": {"rank": 2}, "hyper": {"width": 96}}\'')
    p.add_argument("--head-init", choices=HEAD_INITS, default=None,
                   help="a fresh model's prediction head: tiny (the paper's: A_pred and B_pred both start tiny) or "
                        "lora (A_pred random, B_pred zero, as LoRA); default: --model-config's, else tiny")
    p.add_argument("--head-init-std", type=float, default=None,
                   help=f"std of the head's weights with --head-init tiny (default {HyperConfig.head_init_std})")
    p.add_argument("--init-checkpoint", default="",
                   help="start from this Video2LoRA artifact (e.g. the weight-space warm start of "
                        "jobs/pretrain_hypernet.py); its config wins over --model-config")
    p.add_argument("--ray-address", default=None, help="default: the cluster of `ray job submit`, else a local one")
    p.add_argument("--fail-once-at-step", type=int, default=0, help=argparse.SUPPRESS)  # fault drill
    return p.parse_args(argv)


def build_job(a: argparse.Namespace):
    from pipelines import defaults
    from video2lora.effects.dataset import demo_training_manifest
    from pipelines.train import TrainJobConfig, model_config, parse_model_overrides

    overrides = parse_model_overrides(a.model_config)  # first: a typo fails before anything is rendered or loaded
    head = {k: v for k, v in (("head_init", a.head_init), ("head_init_std", a.head_init_std)) if v is not None}
    if head:
        if a.init_checkpoint:
            raise ValueError("--head-init / --head-init-std initialise a fresh model; --init-checkpoint brings its own")
        overrides = {**overrides, "hyper": {**overrides.get("hyper", {}), **head}}
        model_config(overrides)
    demo = not a.manifest
    manifest = a.manifest or demo_training_manifest(seed=a.seed)
    backbone = a.backbone or defaults.tiny_backbone()
    t = TrainConfig(
        lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip, batch_size=a.batch_size,
        max_steps=a.max_steps or (DEMO_MAX_STEPS if demo else TrainConfig.max_steps),
        warmup_steps=a.warmup_steps, prompt_dropout=a.prompt_dropout,
        checkpoint_every=a.checkpoint_every or (10 if demo else TrainConfig.checkpoint_every),
        keep_checkpoints=a.keep_checkpoints, seed=a.seed, mixed_precision=a.mixed_precision,
        activation_checkpointing={"auto": None, "on": True, "off": False}[a.activation_checkpointing],
    )
    job = TrainJobConfig(
        backbone=backbone, storage_path=a.storage_path, name=a.name, output=a.output, num_workers=a.num_workers,
        use_gpu=a.use_gpu, cpus_per_worker=a.cpus_per_worker or (1.0 if a.use_gpu else 0.5), data_cpus=a.data_cpus,
        train=t, split=a.split, max_failures=a.max_failures, log_every=a.log_every,
        report_every=a.report_every,
        model_overrides=overrides, fail_once_at_step=a.fail_once_at_step,
        init_checkpoint=a.init_checkpoint,
    )
    return job, manifest


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    a = parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # the `train` extra; batch generation does not need it
        print("error: training needs DeepSpeed: pip install -e '.[train]'", file=sys.stderr)
        return 2
    from pipelines.common import ManifestError, init_ray
    from pipelines.prepare import resolve_prepared
    from pipelines.train import run_training
    from video2lora import storage

    try:
        job, manifest = build_job(a)
    except ValueError as e:  # e.g. a --model-config typo: named here, not a traceback in every worker
        print(f"error: {e}", file=sys.stderr)
        return 2
    if job.init_checkpoint:  # refuse a bad warm start before any Ray work (safetensors only, never unpickled)
        from video2lora.hypernet import Video2LoRAModel

        try:
            Video2LoRAModel.from_pretrained(job.init_checkpoint)
        except (OSError, ValueError) as e:
            print(f"error: --init-checkpoint {storage.redact(job.init_checkpoint)} cannot be used: {e}", file=sys.stderr)
            return 2
    init_ray(a.ray_address)
    try:
        prepared = resolve_prepared(
            a.prepared or storage.join(job.storage_path, "prepared"), manifest, job.backbone,
            num_frames=a.num_frames, height=a.height, width=a.width, num_encoders=a.num_encoders,
            encoder_num_gpus=a.encoder_num_gpus if a.encoder_num_gpus is not None else (1.0 if a.use_gpu else 0.0),
        )
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared data: {prepared.uri} ({prepared.num_ok} clips, {prepared.num_failed} failed, "
          f"{'reused' if prepared.skipped else 'encoded now'})")
    job.prepared = prepared.uri
    try:
        info = run_training(job)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in info.items() if k != "deepspeed_config"}))
    ranks = ", ".join(f"rank {i}: {r['moments_numel']:,} moment floats / {r['bytes'] / 2**20:.2f} MiB"
                      for i, r in enumerate(info["per_rank_optimizer_state"]))
    print(f"done: {info['steps']} steps on {info['world_size']} workers (ZeRO-{info['zero_stage']}), "
          f"{info['samples_per_s']:.2f} samples/s; optimizer state per rank: {ranks} "
          f"(of {2 * info['trainable_params']:,} in all); model in {info['output']}, metrics in {info['metrics_table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
