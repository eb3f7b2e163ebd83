"""Item 5: samples/s of 2-worker ZeRO-2 (Ray Train + DeepSpeed) against the single-process loop, and peak
memory per worker."""

from __future__ import annotations

import logging
import os
import time
import traceback

import torch

from pipelines.benchmarks import measure
from pipelines.benchmarks.context import Context, not_measured, row

logger = logging.getLogger("benchmark")  # not under "pipelines": the job quiets those loggers to warnings


# --------------------------------------------------------------------------------------------- item 5
def _single_process_training(prepared: str, backbone: str, train: dict, steps: int, batch: int, threads: int) -> dict:
    """Runs in a fresh Ray actor process, so its peak memory is its own."""
    torch.set_num_threads(threads)
    from video2lora.backbones import Backbone
    from video2lora.config import TrainConfig
    from video2lora.generate import new_model_for
    from video2lora.training import PreparedData, train_single_process

    data = PreparedData.load(prepared)
    bb = Backbone.from_pretrained(backbone, device="cuda" if torch.cuda.is_available() else "cpu")
    model = new_model_for(bb, seed=train.get("seed", 0))
    rows = train_single_process(model, bb, data, TrainConfig(**train), max_steps=steps, batch_size=batch, log_every=0)
    timed = rows[1:] or rows  # the first step warms up
    params = sum(p.numel() for p in model.parameters())
    return {"samples_per_s": batch * len(timed) / sum(batch / r["samples_per_s"] for r in timed),
            "peak_rss_bytes": measure.peak_rss_bytes(), "optimizer_state_bytes": 2 * 4 * params,
            "trainable_params": params, "final_loss": rows[-1]["loss"], "threads": torch.get_num_threads()}


class SingleProcessTraining:
    def run(self, *args) -> dict:
        return _single_process_training(*args)


def bench_training(ctx: Context) -> dict:
    try:
        import ray

        from pipelines.prepare import prepare
        from video2lora.effects.dataset import write_training_clips
        from pipelines.train import TrainJobConfig, run_training
        from video2lora.config import TrainConfig
    except Exception as e:  # noqa: BLE001 - the training job is optional for this benchmark
        return not_measured(5, f"training job not importable ({type(e).__name__}: {e})")
    a = ctx.args
    try:
        manifest = write_training_clips(os.path.join(ctx.work, "train_clips"), seed=0,
                                        clips_per_effect=2 if a.quick else 4)
        prepared = prepare(manifest, ctx.tiny_dir, os.path.join(ctx.work, "prepared")).uri
        train = dict(lr=1e-3, grad_clip=1.0, seed=0, mixed_precision="fp32")
        workers, global_batch = 2, 2
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
        # in a fresh actor process of its own, so its peak memory is the loop's and nothing else's
        single = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(SingleProcessTraining).remote()
        ref = single.run.remote(prepared, ctx.tiny_dir, train, a.train_steps, global_batch, a.threads)
        single_res = ray.get(ref)
        ray.kill(single)
        job = TrainJobConfig(prepared=prepared, backbone=ctx.tiny_dir, storage_path=os.path.join(ctx.work, "train_runs"),
                             name="bench-zero2", num_workers=workers, use_gpu=use_gpu,
                             cpus_per_worker=1.0 if use_gpu else 0.5, data_cpus=0.25, log_every=0,
                             train=TrainConfig(**train, batch_size=global_batch // workers, max_steps=a.train_steps,
                                               checkpoint_every=10**6))
        with measure.ProcessPeakMemory("RayTrainWorker") as mem:
            start = time.perf_counter()
            info = run_training(job)
            wall = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001
        logger.warning("item 5 not measured: %s", traceback.format_exc())
        return not_measured(5, f"{type(e).__name__}: {e}")
    peaks = sorted(mem.peaks.values(), reverse=True)[:workers]
    zero_sps = float(info["samples_per_s"])
    per_rank = info.get("per_rank_optimizer_state") or []
    details = {"steps": a.train_steps, "global_batch": global_batch, "workers": workers, "train": train,
               "single_process": single_res, "zero2": {k: v for k, v in info.items() if k != "deepspeed_config"},
               "zero2_wall_s": wall, "zero2_worker_peak_rss_bytes": peaks}
    table = [
        row(5, f"single-process loop, global batch {global_batch} (tiny, {a.threads} thread)", single_res["samples_per_s"], "samples/s"),
        row(5, f"{workers}-worker ZeRO-2 (Ray Train + DeepSpeed), same global batch", zero_sps, "samples/s"),
        row(5, "  ZeRO-2 / single process", zero_sps / single_res["samples_per_s"], "x"),
        row(5, "  peak RSS per ZeRO-2 worker (max over workers)", max(peaks) / 2**20 if peaks else None, "MiB"),
        row(5, "  peak RSS of the single process", single_res["peak_rss_bytes"] / 2**20, "MiB"),
    ]
    if per_rank:  # AdamW moments: ZeRO-2 partitions them (and the fp32 master copy) across the ranks
        moments = max(r.get("moments_numel", 0) for r in per_rank)
        table.append(row(5, "  AdamW moments held per ZeRO-2 rank / by the single process",
                         moments / (2 * single_res["trainable_params"]), "x", f"1/{workers} (partitioned)",
                         abs(moments / (2 * single_res["trainable_params"]) - 1 / workers) < 0.01))
    return {"table": table, "details": details}
