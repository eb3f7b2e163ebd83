"""Hypernetwork training on Ray Train with DeepSpeed ZeRO-2. The only module that knows about Ray Train/DeepSpeed.

Each of N workers (a `TorchTrainer` worker: gloo on CPU, NCCL on GPU)
* loads the frozen backbone once, outside DeepSpeed (no gradients, no optimizer state), with LightLoRA layers;
* wraps the hypernetwork + aux matrices (`Video2LoRAModel`) with `deepspeed.initialize`: ZeRO stage 2 (optimizer
  state and gradients partitioned across workers), bf16 compute with fp32 master weights, a torch AdamW
  (DeepSpeed compiles nothing: its JIT op loader is disabled here), gradient clipping by DeepSpeed;
* streams its rows of every global batch from the prepared shards through a Ray Data pipeline (reader actor,
  order preserved), in the deterministic order of `video2lora.training.schedule`;
* every K steps reports a checkpoint through `ray.train.report`: each rank's fp32 master partition and AdamW
  moments as `rank-XXXXX.safetensors`, rank 0's `train_state.json` (step, data position, scheduler, metrics) and
  the gathered fp32 model (`model/`, loadable like the final artifact). Nothing is pickled.

A killed run, a rerun of the same command (same --name and --storage-path) or a worker restart by Ray Train's
FailureConfig resumes from the latest checkpoint with step, optimizer, scheduler, data position and RNG restored.
The final artifact (`Video2LoRAModel.save_pretrained`, safetensors + config.json) is written by rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import random
import struct
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from video2lora import storage
from video2lora.config import TrainConfig
from video2lora.training import (
    PreparedData, ShardReader, format_progress, lr_lambda, position_of_step, prompt_dropout, read_metrics, schedule, step_seed,
    training_step, write_metrics,
)

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.json"
MODEL_DIR = "model"
METRICS_NAME = "metrics.csv"
RUN_INFO_NAME = "run_info.json"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainJobConfig:
    """Everything a training run needs; `jobs/train.py` fills it from the command line."""

    prepared: str = ""  # a complete preparation (prepared.json) -- see pipelines/prepare.py
    backbone: str = ""
    storage_path: str = "outputs/train"  # Ray Train run storage (local or s3://); the run is <storage_path>/<name>
    name: str = "video2lora-train"  # stable: a rerun with the same name resumes
    output: str = ""  # final artifact; "" = <storage_path>/<name>/model
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 0.25  # each Ray Data reader task of a worker
    train: TrainConfig = field(default_factory=TrainConfig)
    split: str = "train"  # manifest split to train on ("all": every row)
    max_failures: int = 3
    log_every: int = 10
    zero_stage: int = 2
    model_overrides: dict = field(default_factory=dict)  # {"lora": {...}, "hyper": {...}} over the paper defaults
    init_checkpoint: str = ""  # start from this Video2LoRA artifact (its config wins over model_overrides); "" = fresh
    fail_once_at_step: int = 0  # fault drill: rank 0 crashes once when it reaches this step (0 = never)

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def output_uri(self) -> str:
        return self.output or storage.join(self.run_uri, "model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainJobConfig":
        d = dict(d)
        t = dict(d.pop("train", {}))
        if "betas" in t:
            t["betas"] = tuple(t["betas"])
        return cls(train=TrainConfig(**t), **d)


# --------------------------------------------------------------------------------------------- DeepSpeed setup
def import_deepspeed(use_gpu: bool):
    """Import DeepSpeed so that it never JIT-compiles anything: no shared-memory comm kernel (gloo does the
    collectives on CPU) and any other op build is refused with a clear error instead of running a compiler."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.ops.op_builder.builder import OpBuilder

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

    def refuse(self, verbose=True):
        raise RuntimeError(f"DeepSpeed tried to JIT-compile its {self.name} op; this job uses a torch optimizer "
                           "and builds no DeepSpeed ops")

    OpBuilder.jit_load = refuse
    return deepspeed


def deepspeed_config(job: TrainJobConfig) -> dict:
    t = job.train
    if t.mixed_precision not in ("bf16", "fp32"):
        raise ValueError(f"mixed_precision={t.mixed_precision!r}: use bf16 (fp32 master weights) or fp32; fp16 is not supported")
    if job.zero_stage not in (1, 2):
        raise ValueError(f"zero_stage={job.zero_stage}: this job runs ZeRO stage 1 or 2")
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": job.zero_stage,
            "overlap_comm": bool(job.use_gpu),
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "zero_allow_untested_optimizer": True,  # a plain torch.optim.AdamW: nothing to compile
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def optimizer_state_numel(zero_opt) -> dict:
    """What this rank holds of the optimizer: fp32 master partition and AdamW moments (numel and bytes)."""
    master = sum(p.numel() for p in zero_opt.single_partition_of_fp32_groups)
    moments, nbytes = 0, sum(p.numel() * p.element_size() for p in zero_opt.single_partition_of_fp32_groups)
    for p in zero_opt.single_partition_of_fp32_groups:
        for k, v in zero_opt.optimizer.state.get(p, {}).items():
            if torch.is_tensor(v) and k in ("exp_avg", "exp_avg_sq"):
                moments += v.numel()
                nbytes += v.numel() * v.element_size()
    return {"master_numel": master, "moments_numel": moments, "bytes": nbytes}


def gather_full_fp32(engine) -> dict[str, torch.Tensor]:
    """The full fp32 master weights on every rank (a collective: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in engine.module.named_parameters()}


# --------------------------------------------------------------------------------------------- checkpoints
def _rng_metadata() -> dict[str, str]:
    np_state = np.random.get_state()
    return {
        "python_rng": json.dumps(random.getstate()),
        "numpy_rng": json.dumps([np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]]),
    }


def _restore_rng(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = json.loads(meta["python_rng"])
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy_rng"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def write_rank_state(directory: str, rank: int, world: int, zero_opt) -> None:
    """This rank's fp32 master partition + AdamW state per param group, and its RNG states, as safetensors."""
    from safetensors.torch import save_file

    tensors = {}
    for i, p in enumerate(zero_opt.single_partition_of_fp32_groups):
        tensors[f"group{i}.fp32"] = p.detach().cpu().contiguous()
        for k, v in zero_opt.optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"group{i}.{k}"] = v.detach().cpu().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"rank": str(rank), "world_size": str(world), "format": str(CHECKPOINT_FORMAT), **_rng_metadata()}
    save_file(tensors, os.path.join(directory, f"rank-{rank:05d}.safetensors"), metadata=meta)


def _read_checkpoint_file(checkpoint, name: str) -> bytes:
    path = posixpath.join(checkpoint.path, name)
    with checkpoint.filesystem.open_input_stream(path) as f:
        return f.readall()


def _load_rank_file(data: bytes, name: str):
    """Tensors and string metadata of a safetensors file (anything else is refused, never unpickled)."""
    from video2lora.hypernet import load_safetensors_bytes

    tensors = load_safetensors_bytes(data, name)
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    return tensors, meta


def read_train_state(checkpoint) -> dict:
    """The checkpoint's train_state.json (step, data position, scheduler, ...)."""
    state = json.loads(_read_checkpoint_file(checkpoint, STATE_NAME))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {checkpoint.path}: format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
    return state


def restore_checkpoint(checkpoint, state: dict, engine, zero_opt, scheduler, rank: int, world: int) -> None:
    """Load a checkpoint into the engine: fp32 master partition, AdamW state, RNG, scheduler, step counters."""
    from deepspeed.utils import safe_set_full_fp32_param

    name = f"rank-{rank:05d}.safetensors"
    if state["world_size"] == world:
        tensors, meta = _load_rank_file(_read_checkpoint_file(checkpoint, name), name)
        inner = zero_opt.optimizer
        for i, p in enumerate(zero_opt.single_partition_of_fp32_groups):
            saved = tensors[f"group{i}.fp32"]
            if saved.shape != p.shape:
                raise ValueError(f"checkpoint partition {i} of rank {rank} has shape {tuple(saved.shape)}, "
                                 f"this run's is {tuple(p.shape)}: was the model configuration changed?")
            p.data.copy_(saved.to(p.device))
            keys = [k.split(".", 1)[1] for k in tensors if k.startswith(f"group{i}.") and k != f"group{i}.fp32"]
            inner.state[p] = {k: tensors[f"group{i}.{k}"].to(p.device if k != "step" else "cpu") for k in keys}
        zero_opt.update_lp_params()  # bf16 copies <- fp32 masters, all-gathered (collective)
        _restore_rng(meta, tensors)
    else:  # another worker count: weights exactly, AdamW moments restart
        logger.warning("checkpoint was written by %d workers, this run has %d: restoring the fp32 weights, "
                       "the AdamW moments start afresh", state["world_size"], world)
        from video2lora.hypernet import WEIGHTS_NAME, load_safetensors_bytes

        weights = load_safetensors_bytes(_read_checkpoint_file(checkpoint, f"{MODEL_DIR}/{WEIGHTS_NAME}"), WEIGHTS_NAME)
        for n, p in engine.module.named_parameters():
            safe_set_full_fp32_param(p, weights[n].to(p.device))
        zero_opt.update_lp_params()
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(zero_opt.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = state["step"]
    engine.global_samples = state["samples_seen"]


# --------------------------------------------------------------------------------------------- data
class LoadPairs:
    """Ray Data actor: (target, reference) ids -> target latents/prompt embedding (+ first-frame latents) and the
    reference latents, read from the prepared shards by range requests; a byte-bounded cache of examples."""

    def __init__(self, prepared_uri: str, fields: tuple[str, ...], cache_bytes: int = 1 << 30):
        self.reader = ShardReader(prepared_uri)
        self.fields = tuple(fields)
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self.used = cache_bytes, 0

    def _get(self, shard: str, clip_id: str, fields: tuple[str, ...]) -> dict:
        key = (clip_id, fields)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        ex = {k: v.numpy() for k, v in self.reader.example(shard, clip_id, fields).items()}
        self.cache[key] = ex
        self.used += sum(v.nbytes for v in ex.values())
        while self.used > self.cache_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.used -= sum(v.nbytes for v in old.values())
        return ex

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {f: [] for f in self.fields}
        out["ref_latents"] = []
        for i in range(len(batch["step"])):
            t = self._get(str(batch["target_shard"][i]), str(batch["target_id"][i]), self.fields)
            r = self._get(str(batch["ref_shard"][i]), str(batch["ref_id"][i]), ("latents",))
            for f in self.fields:
                out[f].append(t[f])
            out["ref_latents"].append(r["latents"])
        return {"step": batch["step"], **{k: np.stack(v) for k, v in out.items()}}


_LOADERS: "OrderedDict[tuple, LoadPairs]" = OrderedDict()


def load_pairs(batch: dict[str, np.ndarray], prepared_uri: str, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Ray Data task: LoadPairs kept per process, so pooled Ray workers reuse their shard headers and example cache
    across tasks (and across runs), with no dedicated actor to start."""
    key = (prepared_uri, tuple(fields))
    if key not in _LOADERS:
        _LOADERS[key] = LoadPairs(prepared_uri, tuple(fields), cache_bytes=256 << 20)
        while len(_LOADERS) > 2:
            _LOADERS.popitem(last=False)
    return _LOADERS[key](batch)


def worker_rows(data: PreparedData, seed: int, global_batch: int, batch_size: int, rank: int,
                start_step: int, end_step: int) -> list[dict]:
    """This rank's rows of every global batch from start_step+1 to end_step, in training order."""
    rows = []
    for step, _, _, pairs in schedule(data.effects, seed, global_batch, start_step, end_step):
        for t, r in pairs[rank * batch_size : (rank + 1) * batch_size]:
            rows.append({"step": step, "target_id": data.index[t]["clip_id"], "target_shard": data.index[t]["shard"],
                         "ref_id": data.index[r]["clip_id"], "ref_shard": data.index[r]["shard"]})
    return rows


def stream_batches(data: PreparedData, rows: list[dict], batch_size: int, num_cpus: float, chunk_steps: int = 500):
    """Stream this rank's batches through Ray Data (order preserved), one pipeline per chunk of steps."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    per_chunk = chunk_steps * batch_size
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start : start + per_chunk]
        ds = ray.data.from_items(chunk, override_num_blocks=max(1, math.ceil(len(chunk) / (batch_size * 4))))
        ds = ds.map_batches(load_pairs, fn_kwargs={"prepared_uri": data.uri, "fields": data.fields},
                            batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                            compute=ray.data.TaskPoolStrategy(size=2))
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4)


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (errors are re-raised in the consumer)."""

    _END = object()

    def __init__(self, iterator, depth: int = 4):
        import queue
        import threading

        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="data-prefetch")
        self.thread.start()

    def _run(self, iterator) -> None:
        try:
            for item in iterator:
                self.queue.put(item)
        except BaseException as e:  # handed to the training loop
            self.queue.put(e)
            return
        self.queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


# --------------------------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.training import backbone_fingerprint, prepare_backbone

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    backbone = Backbone.from_pretrained(job.backbone, device=device)  # frozen, outside DeepSpeed
    if job.init_checkpoint:  # a warm start (e.g. the weight-space fit of pretrain_hypernet); same file on every rank
        model = Video2LoRAModel.from_pretrained(job.init_checkpoint)
    else:
        model = new_model_for(backbone, model_config(job.model_overrides), seed=t.seed)  # same seed on every rank
    cfg = model.config
    # DeepSpeed's bf16 mode builds the fp32 master weights from the bf16 copy of the module: a warm start would
    # begin rounded to bf16. Its exact fp32 weights are put back into the masters after initialize.
    init_weights = {k: v.detach().clone() for k, v in model.named_parameters()} if job.init_checkpoint else None
    prepare_backbone(backbone, model)
    fingerprint = backbone_fingerprint(backbone) if rank == 0 else ""
    model.to(device).train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps))
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None  # Ray's GPU, not LOCAL_RANK's
    engine, zero_opt, _, scheduler = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                          lr_scheduler=scheduler, config=deepspeed_config(job))
    compute_dtype = next(engine.module.parameters()).dtype
    if state is None and init_weights is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in engine.module.named_parameters():
            safe_set_full_fp32_param(p, init_weights[n].to(p.device))
        zero_opt.update_lp_params()  # the bf16 compute copies follow the masters
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

    full_weights = None
    per_rank = None
    t_loop = time.perf_counter()
    for step, epoch, offset, _ in schedule(data.effects, t.seed, global_batch, start_step, t.max_steps):
        if job.fail_once_at_step == step and rank == 0:
            marker = storage.join(job.run_uri, f".fault-drill-step-{step}")
            if not storage.exists(marker):
                storage.write_bytes_atomic(marker, b"1")
                raise RuntimeError(f"fault drill: rank 0 crashes at step {step}")
        t0 = time.perf_counter()
        raw = next(batches)
        data_wait = time.perf_counter() - t0
        if step == start_step + 1 and rank == 0:
            logger.info("worker ready in %.1fs (model + DeepSpeed), first batch after %.1fs more",
                        t_ready - t_start, time.perf_counter() - t_ready)
        if int(raw["step"][0]) != step or int(raw["step"][-1]) != step:
            raise RuntimeError(f"data out of order: expected step {step}, got {raw['step'].tolist()}")
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in raw.items() if k != "step"}
        g = torch.Generator().manual_seed(step_seed(t.seed, step, rank))
        batch["prompt_embeds"], _ = prompt_dropout(batch["prompt_embeds"], data.empty_prompt, t.prompt_dropout, g)
        batch["ref_latents"] = batch["ref_latents"].to(compute_dtype)
        loss = training_step(engine.module, backbone, batch, g)
        engine.backward(loss)
        lr = zero_opt.optimizer.param_groups[0]["lr"]
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        mean_loss = loss.detach().float().reshape(1).clone()
        dist.all_reduce(mean_loss)
        samples_seen += global_batch
        dt = time.perf_counter() - t0
        row = dict(step=step, epoch=epoch, loss=float(mean_loss) / world, lr=float(lr),
                   grad_norm=float(grad_norm if grad_norm is not None else float("nan")),
                   samples_per_s=global_batch / dt, data_wait_s=data_wait, time_s=time.perf_counter() - t_loop)
        if per_rank is None:  # what ZeRO left on each rank, once the moments exist
            per_rank = _all_gather_ints(optimizer_state_numel(zero_opt), world, device)
        if rank == 0:
            history.append(row)
            if job.log_every and (step % job.log_every == 0 or step == t.max_steps or step == start_step + 1):
                done = step - start_step
                eta = (time.perf_counter() - t_loop) / done * (t.max_steps - step)
                logger.info(format_progress(row, t.max_steps, eta))
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            next_epoch, next_offset = position_of_step(len(data.index), global_batch, step + 1)  # the data position
            full_weights = _save_and_report(job, engine, zero_opt, scheduler, cfg, rank, world, step, next_epoch,
                                            next_offset, samples_seen, row, history, metrics_uri)
    if full_weights is None:  # nothing trained in this run (already at max_steps): gather for the artifact
        full_weights = gather_full_fp32(engine)
    if per_rank is None:
        per_rank = _all_gather_ints(optimizer_state_numel(zero_opt), world, device)
    if rank == 0:
        final = Video2LoRAModel(cfg)
        final.load_state_dict(full_weights)
        final.save_pretrained(job.output_uri)
        steps_timed = [r for r in history if r["step"] > start_step + 1]  # the first step of a run warms up
        throughput = (sum(global_batch for _ in steps_timed) / sum(global_batch / r["samples_per_s"] for r in steps_timed)
                      if steps_timed else float("nan"))
        total = sum(p.numel() for p in engine.module.parameters())
        info = {
            "world_size": world,
            "global_batch": global_batch,
            "zero_stage": job.zero_stage,
            "mixed_precision": t.mixed_precision,
            "compute_dtype": str(compute_dtype),
            "trainable_params": total,
            "per_rank_optimizer_state": per_rank,
            "backbone_trainable_params": sum(p.numel() for p in backbone.transformer.parameters() if p.requires_grad)
            + sum(p.numel() for p in backbone.vae.parameters() if p.requires_grad),
            "backbone_fingerprint_before": fingerprint,
            "backbone_fingerprint_after": backbone_fingerprint(backbone),
            "steps": t.max_steps,
            "resumed_from_step": start_step,
            "samples_per_s": throughput,
            "output": storage.redact(job.output_uri),
            "deepspeed_config": deepspeed_config(job),
        }
        storage.write_bytes_atomic(storage.join(job.run_uri, RUN_INFO_NAME), json.dumps(info, indent=2).encode())
        storage.write_bytes_atomic(storage.join(job.output_uri, "training.json"), json.dumps(
            {"steps": t.max_steps, "prepared": storage.redact(job.prepared), "backbone": storage.redact(job.backbone),
             "train": dataclasses.asdict(t), "final_loss": history[-1]["loss"] if history else None}, indent=2).encode())
        logger.info("wrote the trained model to %s (%.1f samples/s)", storage.redact(job.output_uri), throughput)


def model_config(overrides: dict | None = None):
    """The paper's Video2LoRAConfig with overrides ({"lora": {...}, "hyper": {...}}); layers come from the backbone."""
    from video2lora.config import Video2LoRAConfig

    try:
        return Video2LoRAConfig.from_dict(_merge(Video2LoRAConfig().to_dict(), overrides or {}))
    except TypeError as e:  # an unknown field: the dataclass names it
        raise ValueError(f"model config overrides {json.dumps(overrides)}: {e}") from None


def parse_model_overrides(text: str) -> dict:
    """--model-config JSON -> overrides, checked against the config dataclasses before any work starts."""
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-config is not JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise ValueError('--model-config must be a JSON object such as {"hyper": {"width": 96}}')
    model_config(overrides)
    return overrides


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _all_gather_ints(d: dict, world: int, device) -> list[dict]:
    import torch.distributed as dist

    keys = sorted(d)
    mine = torch.tensor([int(d[k]) for k in keys], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [dict(zip(keys, p.tolist())) for p in parts]


def _save_and_report(job, engine, zero_opt, scheduler, cfg, rank, world, step, epoch, offset, samples_seen,
                     row, history, metrics_uri) -> dict:
    import ray.train

    from video2lora.hypernet import Video2LoRAModel

    full = gather_full_fp32(engine)  # collective
    with tempfile.TemporaryDirectory(prefix="v2l-ckpt-") as tmp:
        write_rank_state(tmp, rank, world, zero_opt)
        if rank == 0:
            model = Video2LoRAModel(cfg)
            model.load_state_dict(full)
            model.save_pretrained(os.path.join(tmp, MODEL_DIR))
            state = {
                "format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "offset": offset,
                "samples_seen": samples_seen, "world_size": world, "batch_size": job.train.batch_size,
                "seed": job.train.seed, "scheduler": _jsonable(scheduler.state_dict()), "metrics": row,
                "prepared": storage.redact(job.prepared),
            }
            with open(os.path.join(tmp, STATE_NAME), "w") as f:
                json.dump(state, f, indent=2)
            write_metrics(metrics_uri, history)  # the table up to this checkpoint
        ray.train.report({**row, "checkpoint_step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{step:09d}")
    if rank == 0:
        logger.info("checkpoint at step %d written to %s", step, storage.redact(job.run_uri))
    return full


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items() if not callable(v)}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if torch.is_tensor(d):
        return d.item() if d.numel() == 1 else d.tolist()
    return d


# --------------------------------------------------------------------------------------------- the driver
def ray_storage(storage_path: str):
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute; URLs go through fsspec, so
    Ray Train sees the same endpoint and credentials as the rest of the job (e.g. AWS_ENDPOINT_URL)."""
    if "://" not in storage_path or storage_path.startswith("file://"):
        return os.path.abspath(storage_path.removeprefix("file://")), None
    import pyarrow.fs as pafs

    fs, path = storage.fs_and_path(storage_path)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run_training(job: TrainJobConfig) -> dict:
    """Train on Ray (ray.init must have been called); returns a summary. Resumes a run of the same name."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.prepare import absolute

    t = job.train
    if not job.prepared or not job.backbone:
        raise ValueError("run_training needs a prepared data set (job.prepared) and a backbone")
    job = dataclasses.replace(job, prepared=absolute(job.prepared), backbone=absolute(job.backbone),
                              storage_path=absolute(job.storage_path), output=absolute(job.output),
                              init_checkpoint=absolute(job.init_checkpoint))
    data = PreparedData.load(job.prepared, job.split)
    if len(data.index) < job.num_workers * t.batch_size:
        raise ValueError(f"{len(data.index)} training clips (split {job.split!r}) are fewer than one global batch "
                         f"of {job.num_workers} workers x {t.batch_size}")
    deepspeed_config(job)  # refuse bad settings before starting workers
    path, fs = ray_storage(job.storage_path)
    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    info = json.loads(storage.read_bytes(storage.join(job.run_uri, RUN_INFO_NAME)))
    info["wall_s"] = time.perf_counter() - start
    info["metrics_table"] = storage.redact(storage.join(job.run_uri, METRICS_NAME))
    return info
