"""Hypernetwork training on Ray Train with DeepSpeed ZeRO-2. The only package that knows about Ray Train/DeepSpeed.

* `config`: TrainJobConfig (what `jobs/train.py` asks for) and the model configuration with overrides;
* `zero`: DeepSpeed set-up (ZeRO-2, bf16 with fp32 masters, a torch AdamW, no JIT-compiled ops) and its collectives;
* `checkpoint`: the checkpoint format (per-rank safetensors, train_state.json, model/; nothing is pickled);
* `data`: each worker's rows of every global batch, streamed through Ray Data in a deterministic order;
* `worker`: the per-worker loop (set-up, one step, checkpoint/report, the final artifact);
* `job`: the driver, `run_training`.
"""

from pipelines.train.checkpoint import (
    CHECKPOINT_FORMAT, METRICS_NAME, MODEL_DIR, RUN_INFO_NAME, STATE_NAME, read_train_state, restore_checkpoint,
    write_checkpoint, write_rank_state,
)
from pipelines.train.config import TrainJobConfig, model_config, parse_model_overrides
from pipelines.train.data import LoadPairs, Prefetcher, load_pairs, stream_batches, worker_rows
from pipelines.train.job import ray_storage, run_training
from pipelines.train.worker import train_loop_per_worker
from pipelines.train.zero import deepspeed_config, gather_full_fp32, import_deepspeed, optimizer_state_numel

__all__ = [
    "CHECKPOINT_FORMAT", "METRICS_NAME", "MODEL_DIR", "RUN_INFO_NAME", "STATE_NAME", "LoadPairs", "Prefetcher",
    "TrainJobConfig", "deepspeed_config", "gather_full_fp32", "import_deepspeed", "load_pairs", "model_config",
    "optimizer_state_numel", "parse_model_overrides", "ray_storage", "read_train_state", "restore_checkpoint",
    "run_training", "stream_batches", "train_loop_per_worker", "worker_rows", "write_checkpoint", "write_rank_state",
]
