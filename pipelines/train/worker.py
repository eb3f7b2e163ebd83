"""The per-worker training loop. Ray Train pickles `train_loop_per_worker` by reference, so its workers import it
from this module (`pipelines.train.worker`, on the PYTHONPATH that `pipelines.common.init_ray` ships).

Each of N workers (a `TorchTrainer` worker: gloo on CPU, NCCL on GPU)
* loads the frozen backbone once, outside DeepSpeed (no gradients, no optimizer state), with LightLoRA layers;
* wraps the hypernetwork + aux matrices (`Video2LoRAModel`) with `deepspeed.initialize` (see `zero.py`);
* streams its rows of every global batch from the prepared shards (see `data.py`);
* every K steps reports a checkpoint through `ray.train.report` (see `checkpoint.py`).
The final artifact (`Video2LoRAModel.save_pretrained`, safetensors + config.json) is written by rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from video2lora import storage
from video2lora.training import (
    PreparedData, format_progress, lr_lambda, position_of_step, prompt_dropout, read_metrics, schedule, step_seed,
    training_step, write_metrics,
)
from pipelines.train.checkpoint import METRICS_NAME, RUN_INFO_NAME, read_train_state, restore_checkpoint, write_checkpoint
from pipelines.train.config import TrainJobConfig, model_config
from pipelines.train.data import Prefetcher, stream_batches, worker_rows
from pipelines.train.zero import (
    all_gather_ints, deepspeed_config, gather_full_fp32, import_deepspeed, optimizer_state_numel, set_full_fp32,
)

logger = logging.getLogger(__name__)
TRAINING_COMPONENTS = ("transformer",)  # what a worker loads of the backbone (no text encoder, no VAE)


@dataclass
class WorkerRun:
    """One worker's run as `set_up_worker` leaves it: who it is, its data stream, the engine, the metrics so far."""

    job: TrainJobConfig
    rank: int
    world: int
    device: torch.device
    data: PreparedData
    start_step: int  # the step of the checkpoint resumed from (0: a fresh run)
    samples_seen: int
    batches: Prefetcher
    backbone: object  # frozen, outside DeepSpeed
    cfg: object  # the model's Video2LoRAConfig
    fingerprint: str  # the backbone's before training (rank 0; "" elsewhere)
    engine: object
    zero_opt: object
    scheduler: object
    compute_dtype: torch.dtype
    t_start: float
    t_ready: float
    metrics_uri: str
    history: list  # rank 0: one metrics row per step

    @property
    def global_batch(self) -> int:
        return self.world * self.job.train.batch_size


LIVE_METRICS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s")


def train_loop_per_worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    w = set_up_worker(config)
    t = w.job.train
    full_weights = None  # the gathered fp32 weights of the latest checkpoint
    per_rank = None
    t_loop = time.perf_counter()
    for step, epoch, _, _ in schedule(w.data.effects, t.seed, w.global_batch, w.start_step, t.max_steps):
        _fault_drill(w.job, step, w.rank)
        row = train_step(w, step, epoch, t_loop)
        if per_rank is None:  # what ZeRO left on each rank, once the moments exist
            per_rank = all_gather_ints(optimizer_state_numel(w.zero_opt), w.world, w.device)
        if w.rank == 0:
            w.history.append(row)
            if w.job.log_every and (step % w.job.log_every == 0 or step == t.max_steps or step == w.start_step + 1):
                done = step - w.start_step
                eta = (time.perf_counter() - t_loop) / done * (t.max_steps - step)
                logger.info(format_progress(row, t.max_steps, eta))
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            full_weights = save_and_report(w, step, row)
        elif w.job.report_every and step % w.job.report_every == 0:
            import ray.train

            ray.train.report({k: row[k] for k in LIVE_METRICS})  # every rank (a collective), no checkpoint
    if full_weights is None:  # nothing trained in this run (already at max_steps): gather for the artifact
        full_weights = gather_full_fp32(w.engine)
    if per_rank is None:
        per_rank = all_gather_ints(optimizer_state_numel(w.zero_opt), w.world, w.device)
    if w.rank == 0:
        write_final_artifact(w, full_weights, per_rank)


# --------------------------------------------------------------------------------------------- set-up
def set_up_worker(config: dict) -> WorkerRun:
    """The data stream, the backbone and the DeepSpeed engine, resumed from the latest checkpoint if there is one."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    job = TrainJobConfig.from_dict(config)
    t = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    data = PreparedData.load(job.prepared, job.split)
    global_batch = world * t.batch_size

    # where to start: the latest checkpoint's step fixes the data position, so the data stream starts at once and
    # warms up (reader actor, first shards) while DeepSpeed and the backbone load
    checkpoint = ray.train.get_checkpoint()
    state = read_train_state(checkpoint) if checkpoint is not None else None
    start_step, samples_seen = (state["step"], state["samples_seen"]) if state else (0, 0)
    rows = worker_rows(data, t.seed, global_batch, t.batch_size, rank, start_step, t.max_steps)
    batches = Prefetcher(stream_batches(data, rows, t.batch_size, job.data_cpus), depth=4)

    deepspeed = import_deepspeed(job.use_gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo", auto_mpi_discovery=False)
    backbone, model, init_weights, fingerprint = _load_models(job, device, rank)
    engine, zero_opt, scheduler = _wrap_with_deepspeed(deepspeed, job, model, device)
    compute_dtype = next(engine.module.parameters()).dtype
    if state is None and init_weights is not None:
        set_full_fp32(engine, zero_opt, init_weights)
    if state is not None:
        restore_checkpoint(checkpoint, state, engine, zero_opt, scheduler, rank, world)
        if state["world_size"] * state["batch_size"] != global_batch and rank == 0:
            logger.warning("the global batch changed from %d to %d: the data position is recomputed for step %d",
                           state["world_size"] * state["batch_size"], global_batch, start_step)
        if rank == 0:
            logger.info("resumed from %s at step %d (epoch %d, offset %d)", checkpoint.path, start_step,
                        state["epoch"], state["offset"])
    t_ready = time.perf_counter()
    metrics_uri = storage.join(job.run_uri, METRICS_NAME)
    history = [r for r in read_metrics(metrics_uri) if r["step"] <= start_step] if rank == 0 else []
    return WorkerRun(job=job, rank=rank, world=world, device=device, data=data, start_step=start_step,
                     samples_seen=samples_seen, batches=batches, backbone=backbone, cfg=model.config,
                     fingerprint=fingerprint, engine=engine, zero_opt=zero_opt, scheduler=scheduler,
                     compute_dtype=compute_dtype, t_start=t_start, t_ready=t_ready, metrics_uri=metrics_uri,
                     history=history)


def _load_models(job: TrainJobConfig, device, rank: int):
    """(frozen backbone with LightLoRA layers, the model on `device`, a warm start's fp32 weights or None, the
    backbone's fingerprint on rank 0)."""
    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.training import backbone_fingerprint, prepare_backbone

    t = job.train
    # frozen, outside DeepSpeed; the DiT only: prompts, latents and I2V first frames come prepared
    backbone = Backbone.from_pretrained(job.backbone, device=device, components=TRAINING_COMPONENTS)
    if job.init_checkpoint:  # a warm start (e.g. the weight-space fit of pretrain_hypernet); same file on every rank
        model = Video2LoRAModel.from_pretrained(job.init_checkpoint)
    else:
        model = new_model_for(backbone, model_config(job.model_overrides), seed=t.seed)  # same seed on every rank
    # DeepSpeed's bf16 mode builds the fp32 master weights from the bf16 copy of the module: a warm start would
    # begin rounded to bf16. Its exact fp32 weights are put back into the masters after initialize.
    init_weights = {k: v.detach().clone() for k, v in model.named_parameters()} if job.init_checkpoint else None
    prepare_backbone(backbone, model, job.train.activation_checkpointing)
    fingerprint = backbone_fingerprint(backbone) if rank == 0 else ""
    model.to(device).train()
    return backbone, model, init_weights, fingerprint


def _wrap_with_deepspeed(deepspeed, job: TrainJobConfig, model, device):
    """(engine, ZeRO optimizer, LR scheduler) from `deepspeed.initialize` over a torch AdamW + warm-up schedule."""
    t = job.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps))
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None  # Ray's GPU, not LOCAL_RANK's
    engine, zero_opt, _, scheduler = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                          lr_scheduler=scheduler, config=deepspeed_config(job))
    return engine, zero_opt, scheduler


# --------------------------------------------------------------------------------------------- one step
def _fault_drill(job: TrainJobConfig, step: int, rank: int) -> None:
    if job.fail_once_at_step == step and rank == 0:
        marker = storage.join(job.run_uri, f".fault-drill-step-{step}")
        if not storage.exists(marker):
            storage.write_bytes_atomic(marker, b"1")
            raise RuntimeError(f"fault drill: rank 0 crashes at step {step}")


def train_step(w: WorkerRun, step: int, epoch: int, t_loop: float) -> dict:
    """One optimizer step on this rank's next batch; returns the step's metrics row (loss averaged over ranks)."""
    import torch.distributed as dist

    t = w.job.train
    t0 = time.perf_counter()
    raw = next(w.batches)
    data_wait = time.perf_counter() - t0
    if step == w.start_step + 1 and w.rank == 0:
        logger.info("worker ready in %.1fs (model + DeepSpeed), first batch after %.1fs more",
                    w.t_ready - w.t_start, time.perf_counter() - w.t_ready)
    if int(raw["step"][0]) != step or int(raw["step"][-1]) != step:
        raise RuntimeError(f"data out of order: expected step {step}, got {raw['step'].tolist()}")
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(w.device) for k, v in raw.items() if k != "step"}
    g = torch.Generator().manual_seed(step_seed(t.seed, step, w.rank))
    batch["prompt_embeds"], _ = prompt_dropout(batch["prompt_embeds"], w.data.empty_prompt, t.prompt_dropout, g)
    batch["ref_latents"] = batch["ref_latents"].to(w.compute_dtype)
    loss = training_step(w.engine.module, w.backbone, batch, g)
    w.engine.backward(loss)
    lr = w.zero_opt.optimizer.param_groups[0]["lr"]
    w.engine.step()
    grad_norm = w.engine.get_global_grad_norm()
    mean_loss = loss.detach().float().reshape(1).clone()
    dist.all_reduce(mean_loss)
    w.samples_seen += w.global_batch
    dt = time.perf_counter() - t0
    return dict(step=step, epoch=epoch, loss=float(mean_loss) / w.world, lr=float(lr),
                grad_norm=float(grad_norm if grad_norm is not None else float("nan")),
                samples_per_s=w.global_batch / dt, data_wait_s=data_wait, time_s=time.perf_counter() - t_loop)


# --------------------------------------------------------------------------------------------- checkpoint, report
def save_and_report(w: WorkerRun, step: int, row: dict) -> dict:
    """Write a checkpoint after `step` and report it to Ray Train (a collective); returns the full fp32 weights."""
    import ray.train

    epoch, offset = position_of_step(len(w.data.index), w.global_batch, step + 1)  # the data position
    full = gather_full_fp32(w.engine)  # collective
    with tempfile.TemporaryDirectory(prefix="v2l-ckpt-") as tmp:
        write_checkpoint(tmp, w.job, w.zero_opt, w.scheduler, w.cfg, full, w.rank, w.world, step, epoch, offset,
                         w.samples_seen, row)
        if w.rank == 0:
            write_metrics(w.metrics_uri, w.history)  # the table up to this checkpoint
        ray.train.report({**row, "checkpoint_step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{step:09d}")
    if w.rank == 0:
        logger.info("checkpoint at step %d written to %s", step, storage.redact(w.job.run_uri))
    return full


def write_final_artifact(w: WorkerRun, full_weights: dict, per_rank: list[dict]) -> None:
    """Rank 0: the trained model, its training.json, and the run's run_info.json (what run_training returns)."""
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.training import backbone_fingerprint

    job, t, history, global_batch = w.job, w.job.train, w.history, w.global_batch
    final = Video2LoRAModel(w.cfg)
    final.load_state_dict(full_weights)
    final.save_pretrained(job.output_uri)
    steps_timed = [r for r in history if r["step"] > w.start_step + 1]  # the first step of a run warms up
    throughput = (sum(global_batch for _ in steps_timed) / sum(global_batch / r["samples_per_s"] for r in steps_timed)
                  if steps_timed else float("nan"))
    total = sum(p.numel() for p in w.engine.module.parameters())
    info = {
        "world_size": w.world,
        "global_batch": global_batch,
        "zero_stage": job.zero_stage,
        "mixed_precision": t.mixed_precision,
        "compute_dtype": str(w.compute_dtype),
        "trainable_params": total,
        "per_rank_optimizer_state": per_rank,
        "backbone_components": list(w.backbone.modules()),
        "backbone_trainable_params": sum(p.numel() for m in w.backbone.modules().values() for p in m.parameters()
                                         if p.requires_grad),
        "backbone_fingerprint_before": w.fingerprint,
        "backbone_fingerprint_after": backbone_fingerprint(w.backbone),
        "steps": t.max_steps,
        "resumed_from_step": w.start_step,
        "samples_per_s": throughput,
        "output": storage.redact(job.output_uri),
        "deepspeed_config": deepspeed_config(job),
    }
    storage.write_bytes_atomic(storage.join(job.run_uri, RUN_INFO_NAME), json.dumps(info, indent=2).encode())
    storage.write_bytes_atomic(storage.join(job.output_uri, "training.json"), json.dumps(
        {"steps": t.max_steps, "prepared": storage.redact(job.prepared), "backbone": storage.redact(job.backbone),
         "train": dataclasses.asdict(t), "final_loss": history[-1]["loss"] if history else None}, indent=2).encode())
    logger.info("wrote the trained model to %s (%.1f samples/s)", storage.redact(job.output_uri), throughput)
