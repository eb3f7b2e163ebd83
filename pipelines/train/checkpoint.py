"""The checkpoint format and the run's files. Nothing is pickled.

Every K steps a worker reports a checkpoint through `ray.train.report`: each rank's fp32 master partition and AdamW
moments as `rank-XXXXX.safetensors`, rank 0's `train_state.json` (step, data position, scheduler, metrics) and the
gathered fp32 model (`model/`, loadable like the final artifact).

A killed run, a rerun of the same command (same --name and --storage-path) or a worker restart by Ray Train's
FailureConfig resumes from the latest checkpoint with step, optimizer, scheduler, data position and RNG restored.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random

import numpy as np
import torch

from video2lora import storage
from pipelines.train.zero import set_full_fp32

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.json"
MODEL_DIR = "model"
METRICS_NAME = "metrics.csv"  # in the run directory, beside the checkpoints
RUN_INFO_NAME = "run_info.json"  # in the run directory: the summary run_training returns
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------- writing
def _rng_metadata() -> dict[str, str]:
    np_state = np.random.get_state()
    return {
        "python_rng": json.dumps(random.getstate()),
        "numpy_rng": json.dumps([np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]]),
    }


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


def write_checkpoint(directory: str, job, zero_opt, scheduler, cfg, full: dict, rank: int, world: int, step: int,
                     epoch: int, offset: int, samples_seen: int, row: dict) -> None:
    """One checkpoint into a local directory: every rank's own state; rank 0 also the gathered fp32 model `full`
    and train_state.json (epoch, offset: the data position of the next step)."""
    from video2lora.hypernet import Video2LoRAModel

    write_rank_state(directory, rank, world, zero_opt)
    if rank == 0:
        model = Video2LoRAModel(cfg)
        model.load_state_dict(full)
        model.save_pretrained(os.path.join(directory, MODEL_DIR))
        state = {
            "format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "offset": offset,
            "samples_seen": samples_seen, "world_size": world, "batch_size": job.train.batch_size,
            "seed": job.train.seed, "scheduler": _jsonable(scheduler.state_dict()), "metrics": row,
            "prepared": storage.redact(job.prepared),
        }
        with open(os.path.join(directory, STATE_NAME), "w") as f:
            json.dump(state, f, indent=2)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items() if not callable(v)}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if torch.is_tensor(d):
        return d.item() if d.numel() == 1 else d.tolist()
    return d


# --------------------------------------------------------------------------------------------- reading
def _restore_rng(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = json.loads(meta["python_rng"])
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy_rng"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _read_checkpoint_file(checkpoint, name: str) -> bytes:
    path = posixpath.join(checkpoint.path, name)
    with checkpoint.filesystem.open_input_stream(path) as f:
        return f.readall()


def _load_rank_file(data: bytes, name: str):
    """Tensors and string metadata of a safetensors file (anything else is refused, never unpickled)."""
    from video2lora.hypernet import load_safetensors_with_metadata

    return load_safetensors_with_metadata(data, name)


def read_train_state(checkpoint) -> dict:
    """The checkpoint's train_state.json (step, data position, scheduler, ...)."""
    state = json.loads(_read_checkpoint_file(checkpoint, STATE_NAME))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {checkpoint.path}: format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
    return state


def restore_checkpoint(checkpoint, state: dict, engine, zero_opt, scheduler, rank: int, world: int) -> None:
    """Load a checkpoint into the engine: fp32 master partition, AdamW state, RNG, scheduler, step counters."""
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
        set_full_fp32(engine, zero_opt, weights)
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(zero_opt.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = state["step"]
    engine.global_samples = state["samples_seen"]
