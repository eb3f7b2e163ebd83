"""What a training run is asked to do: `TrainJobConfig` (filled by `jobs/train.py`) and the model configuration
built from the paper's defaults plus `--model-config` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from video2lora import storage
from video2lora.config import TrainConfig


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
    # metrics (loss, lr, grad norm, samples/s) to Ray Train every N steps: the dashboard's live curve. Checkpoint
    # steps report with their checkpoint; metrics.csv keeps every step. 0: only at checkpoints
    report_every: int = 5
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
