"""Faults in training: a Ray Train worker killed mid-run, and a checkpoint cut short. 2 CPU workers, ZeRO-2, tiny
models; the run storage is local."""

import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from video2lora import storage
from video2lora.config import TrainConfig
from video2lora.training import read_metrics

EFFECTS = ["colour_cycle", "spin", "zoom_in", "slide_left"]
MODEL = {"hyper": {"width": 48, "num_blocks": 2, "num_heads": 4, "iterations": 2, "head_init_std": 0.02}}  # small + fast
TRAIN = dict(lr=2e-3, grad_clip=1.0, batch_size=1, checkpoint_every=2, keep_checkpoints=3, prompt_dropout=0.2, seed=3)
CHECKPOINT_FILES = ["model", "rank-00000.safetensors", "rank-00001.safetensors", "train_state.json"]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tiny_backbone_dir, tmp_path_factory):
    from pipelines.prepare import prepare
    from video2lora.effects.dataset import write_training_clips

    manifest = write_training_clips(str(tmp_path_factory.mktemp("train-clips")), seed=5, clips_per_effect=2, effects=EFFECTS)
    return prepare(manifest, tiny_backbone_dir, str(tmp_path_factory.mktemp("prepared"))).uri


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


def _job(prepared, backbone, run_root, max_steps):
    from pipelines.train import TrainJobConfig

    return TrainJobConfig(prepared=prepared, backbone=backbone, storage_path=run_root, name="faulty", num_workers=2,
                          cpus_per_worker=0.5, data_cpus=0.25, log_every=1, max_failures=2, model_overrides=MODEL,
                          train=TrainConfig(**TRAIN, max_steps=max_steps))


def _complete_checkpoints(run_dir) -> list[int]:
    steps = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if name.startswith("checkpoint-") and sorted(os.listdir(os.path.join(run_dir, name))) == CHECKPOINT_FILES:
            steps.append(int(name.split("-")[1]))
    return sorted(steps)


def _registered_checkpoint(run_dir) -> int:
    """Step of the newest checkpoint Ray Train has registered (its checkpoint manager snapshot); 0 if none."""
    import json

    try:
        snapshot = json.loads(open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")).read())
    except (OSError, ValueError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name") or ""
    return int(name.split("-")[1]) if name.startswith("checkpoint-") else 0


def _train_workers() -> list[int]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def test_training_worker_killed_resumes_from_last_checkpoint(ray_cluster, prepared, tiny_backbone_dir, run_root):
    from pipelines.train import run_training
    from video2lora.hypernet import Video2LoRAModel

    job = _job(prepared, tiny_backbone_dir, run_root, max_steps=8)
    run_dir = os.path.join(run_root, job.name)
    outcome = {}

    def train():
        try:
            outcome["info"] = run_training(job)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    end = time.time() + 600
    while time.time() < end and thread.is_alive() and not _registered_checkpoint(run_dir):
        time.sleep(0.2)
    seen = _registered_checkpoint(run_dir)
    workers = _train_workers()
    assert seen and workers and thread.is_alive(), (seen, workers, outcome)
    assert seen < 8, "the run finished before a worker could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")

    info = outcome["info"]
    # Ray Train restarted the workers from the newest checkpoint there was (a later one may have landed meanwhile)
    assert info["resumed_from_step"] >= seen and info["resumed_from_step"] % TRAIN["checkpoint_every"] == 0
    metrics = read_metrics(storage.join(job.run_uri, "metrics.csv"))
    assert [m["step"] for m in metrics] == list(range(1, 9))  # no step lost, none counted twice
    assert _complete_checkpoints(run_dir)[-1] == 8
    Video2LoRAModel.from_pretrained(job.output_uri)


def test_checkpoint_cut_short_is_never_the_latest(ray_cluster, prepared, tiny_backbone_dir, run_root):
    """A checkpoint whose upload was cut short (some files, no train_state.json, a truncated rank file) sits next to
    the finished step-8 checkpoint; the same command to 10 steps resumes from step 8, never from it."""
    from pipelines.train import run_training

    job = _job(prepared, tiny_backbone_dir, run_root, max_steps=10)
    run_dir = os.path.join(run_root, job.name)
    if _complete_checkpoints(run_dir)[-1:] != [8]:  # run alone: make the step-8 checkpoint first
        run_training(_job(prepared, tiny_backbone_dir, run_root, max_steps=8))
    cut = os.path.join(run_dir, "checkpoint-000000009")
    os.makedirs(cut)
    shutil.copytree(os.path.join(run_dir, "checkpoint-000000008", "model"), os.path.join(cut, "model"))
    whole = open(os.path.join(run_dir, "checkpoint-000000008", "rank-00000.safetensors"), "rb").read()
    open(os.path.join(cut, "rank-00000.safetensors"), "wb").write(whole[: len(whole) // 2])

    info = run_training(job)
    assert info["resumed_from_step"] == 8
    assert [m["step"] for m in read_metrics(storage.join(job.run_uri, "metrics.csv"))] == list(range(1, 11))
    assert _complete_checkpoints(run_dir)[-1] == 10
