"""Training maths, with no Ray and no DeepSpeed: the prepared data and its order (`data`), the diffusion loss
(`loss`), the plain single-process loop and metrics table (`loop`), and the weight-space warm start (`warmstart`).
The Ray Train job (`pipelines/train/`) runs these same pieces on every worker."""

from .data import (
    EMPTY_PROMPT_NAME, ERRORS_NAME, INDEX_NAME, PREPARED_FORMAT, PREPARED_NAME, SHARDS_DIR, TENSOR_FIELDS,
    PreparedData, ShardReader, collate, draw_pairs, position_of_step, prepared_key, schedule, stack_examples,
    step_seed, steps_per_epoch, tensor_key,
)
from .loop import METRIC_COLUMNS, format_progress, metrics_csv, read_metrics, train_single_process, write_metrics
from .loss import (
    backbone_fingerprint, batch_loss, eval_loss, lr_lambda, prepare_backbone, prompt_dropout, training_step,
)

__all__ = [
    "EMPTY_PROMPT_NAME", "ERRORS_NAME", "INDEX_NAME", "METRIC_COLUMNS", "PREPARED_FORMAT", "PREPARED_NAME",
    "SHARDS_DIR", "TENSOR_FIELDS", "PreparedData", "ShardReader", "backbone_fingerprint", "batch_loss", "collate",
    "draw_pairs", "eval_loss", "format_progress", "lr_lambda", "metrics_csv", "position_of_step", "prepare_backbone",
    "prepared_key", "prompt_dropout", "read_metrics", "schedule", "stack_examples", "step_seed", "steps_per_epoch",
    "tensor_key", "train_single_process", "training_step", "write_metrics",
]
