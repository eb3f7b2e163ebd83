"""The driver: checks the job, then runs `train_loop_per_worker` on N Ray Train workers (`TorchTrainer`) with run
storage, checkpoint retention and restarts (FailureConfig); returns the run's summary."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from video2lora import storage
from video2lora.training import PreparedData
from pipelines.train.checkpoint import METRICS_NAME, RUN_INFO_NAME
from pipelines.train.config import TrainJobConfig
from pipelines.train.worker import train_loop_per_worker
from pipelines.train.zero import deepspeed_config


def ray_storage(storage_path: str):
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute; URLs go through fsspec, so
    Ray Train sees the same endpoint and credentials as the rest of the job (e.g. AWS_ENDPOINT_URL)."""
    if "://" not in storage_path or storage_path.startswith("file://"):
        return os.path.abspath(storage_path.removeprefix("file://")), None
    import pyarrow.fs as pafs

    fs, path = storage.fs_and_path(storage_path)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run_training(job: TrainJobConfig, callbacks=()) -> dict:
    """Train on Ray (ray.init must have been called); returns a summary. Resumes a run of the same name.
    `callbacks`: Ray Train `UserCallback`s (e.g. to forward each report to an experiment tracker)."""
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
        train_loop_per_worker,  # pickled by reference: workers import pipelines.train.worker
        train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=job.max_failures),
            callbacks=list(callbacks),
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
