"""DeepSpeed ZeRO set-up and the collectives around it.

The hypernetwork + aux matrices (`Video2LoRAModel`) are wrapped with `deepspeed.initialize`: ZeRO stage 2 (optimizer
state and gradients partitioned across workers), bf16 compute with fp32 master weights, a torch AdamW (DeepSpeed
compiles nothing: its JIT op loader is disabled here), gradient clipping by DeepSpeed.
"""

from __future__ import annotations

import os
import sys

import torch

from pipelines.train.config import TrainJobConfig


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


def set_full_fp32(engine, zero_opt, weights: dict[str, torch.Tensor]) -> None:
    """Put these full fp32 weights into the masters; the bf16 compute copies follow (a collective)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for n, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, weights[n].to(p.device))
    zero_opt.update_lp_params()  # the bf16 compute copies follow the masters


def all_gather_ints(d: dict, world: int, device) -> list[dict]:
    """Every rank's dict of ints (same keys on every rank), in rank order (a collective)."""
    import torch.distributed as dist

    keys = sorted(d)
    mine = torch.tensor([int(d[k]) for k in keys], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [dict(zip(keys, p.tolist())) for p in parts]
