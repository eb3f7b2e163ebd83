"""Training: pairing, the plain loop, Ray Data preparation, and Ray Train + DeepSpeed ZeRO-2 over gloo (2 CPU workers,
tiny models) with checkpoints on an S3 bucket served by moto. One local Ray instance for the module."""

import json
import os

import numpy as np
import pytest
import torch

from video2lora import storage
from video2lora.config import TrainConfig
from video2lora.training import (
    PreparedData, draw_pairs, eval_loss, position_of_step, prompt_dropout, read_metrics, schedule, step_seed,
    train_single_process,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EFFECTS = ["colour_cycle", "spin", "zoom_in", "slide_left"]
CLIPS_PER_EFFECT = 2
BUCKET = "v2l-train"
MODEL = {"hyper": {"width": 48, "num_blocks": 2, "num_heads": 4, "iterations": 2, "head_init_std": 0.02}}  # small + fast
TRAIN = dict(lr=2e-3, grad_clip=1.0, batch_size=1, checkpoint_every=2, keep_checkpoints=2, prompt_dropout=0.2, seed=3)


# --------------------------------------------------------------------------------------------- pure pieces
def test_training_reports_live_metrics_between_checkpoints(runs):
    job, _, _ = runs["straight"]
    steps = [r["step"] for r in LIVE_REPORTS]
    assert steps == list(range(1, 7)), LIVE_REPORTS  # report_every=1 in job_config: every step reaches Ray Train
    for r in LIVE_REPORTS:
        assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(r) and r["samples_per_s"] > 0
        assert r["checkpoint"] == (r["step"] % job.train.checkpoint_every == 0 or r["step"] == 6)


def test_pairs_are_same_effect_never_self_and_redrawn_each_epoch():
    effects = ["a"] * 4 + ["b"] * 3 + ["c"]
    epochs = [draw_pairs(effects, seed=7, epoch=e) for e in range(6)]
    for pairs in epochs:
        assert sorted(t for t, _ in pairs) == list(range(len(effects)))  # every clip is a target once
        for t, r in pairs:
            assert effects[t] == effects[r]
            assert (r != t) or effects.count(effects[t]) == 1  # itself only when alone in its class
    assert len({tuple(p) for p in epochs}) > 1  # re-drawn every epoch
    assert draw_pairs(effects, 7, 3) == epochs[3]  # seeded
    refs = {r for p in epochs for t, r in p if t == 0}
    assert refs == {1, 2, 3}  # over epochs, references cover the other clips of the class


def test_schedule_positions_and_batches():
    effects = ["a", "a", "b", "b", "c"]
    steps = list(schedule(effects, seed=1, global_batch=2, start_step=0, end_step=5))
    assert [(s, e, o) for s, e, o, _ in steps] == [(1, 0, 0), (2, 0, 2), (3, 1, 0), (4, 1, 2), (5, 2, 0)]
    resumed = list(schedule(effects, seed=1, global_batch=2, start_step=3, end_step=5))
    assert resumed == steps[3:]  # the data position follows from the step alone
    assert position_of_step(5, 2, 3) == (1, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        position_of_step(3, 4, 1)
    assert step_seed(0, 1, 0) != step_seed(0, 1, 1) != step_seed(0, 2, 0)


def test_prompt_dropout_uses_the_empty_prompt():
    embeds, empty = torch.ones(64, 3, 2), torch.zeros(3, 2)
    out, drop = prompt_dropout(embeds, empty, 0.5, torch.Generator().manual_seed(0))
    assert 10 < int(drop.sum()) < 54
    assert torch.equal(out[drop], torch.zeros(int(drop.sum()), 3, 2)) and torch.equal(out[~drop], embeds[~drop])
    same, none = prompt_dropout(embeds, empty, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, embeds) and not none.any()


# --------------------------------------------------------------------------------------------- Ray fixtures
@pytest.fixture(scope="module")
def ray_s3(s3_server, tmp_path_factory):
    import boto3
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    ext_dir = tmp_path_factory.mktemp("torch_extensions")  # DeepSpeed must compile nothing into it
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONPATH=REPO, RAY_USAGE_STATS_ENABLED="0")
    ray.init(address="local", num_cpus=2, log_to_driver=False, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield {"endpoint": s3_server, "torch_extensions": str(ext_dir)}
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from video2lora.effects.dataset import write_training_clips

    d = tmp_path_factory.mktemp("clips")
    path = write_training_clips(str(d), seed=5, clips_per_effect=CLIPS_PER_EFFECT, effects=EFFECTS)
    (d / "broken.mp4").write_bytes(b"not a video at all" * 40)
    rows = pq.read_table(path).to_pylist()
    rows.append({"clip_id": "broken", "video_uri": "broken.mp4", "prompt": "a red circle", "effect": "spin", "split": "train"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def prepared(ray_s3, manifest, tiny_backbone_dir, tmp_path_factory):
    from pipelines.prepare import prepare

    root = str(tmp_path_factory.mktemp("prepared"))
    first = prepare(manifest, tiny_backbone_dir, root)
    return first, root


def job_config(prepared_uri, backbone, storage_path, name, **train):
    from pipelines.train import TrainJobConfig

    return TrainJobConfig(
        prepared=prepared_uri, backbone=backbone, storage_path=storage_path, name=name, num_workers=2,
        cpus_per_worker=0.5, data_cpus=0.25, log_every=1, report_every=1, max_failures=2, train=TrainConfig(**{**TRAIN, **train}),
        model_overrides=MODEL,
    )


LIVE_REPORTS: list[dict] = []  # what Ray Train received from the "straight" run, in order


@pytest.fixture(scope="module")
def runs(ray_s3, prepared, tiny_backbone_dir):
    """Two runs on S3: "straight" does 6 steps in one go, "resumed" stops after 3 (the resume test goes on)."""
    from pipelines.train import run_training

    import ray
    from ray.train import UserCallback

    @ray.remote(num_cpus=0)
    class ReportLog:
        def __init__(self):
            self.received = []

        def add(self, row):
            self.received.append(row)

        def rows(self):
            return self.received

    class RecordReports(UserCallback):
        """Sends every report Ray Train receives to the ReportLog actor (callbacks run in Train's controller)."""

        def after_report(self, run_context, metrics, checkpoint):
            log = ray.get_actor("train-reports", namespace="video2lora-tests")
            ray.get(log.add.remote({**metrics[0], "checkpoint": checkpoint is not None}))

    jobs = {"straight": job_config(prepared[0].uri, tiny_backbone_dir, f"s3://{BUCKET}/runs", "straight", max_steps=6),
            "resumed": job_config(prepared[0].uri, tiny_backbone_dir, f"s3://{BUCKET}/runs", "resumed", max_steps=3)}
    reports = ReportLog.options(name="train-reports", namespace="video2lora-tests").remote()
    infos = {name: run_training(job, callbacks=[RecordReports()] if name == "straight" else ()) for name, job in jobs.items()}
    LIVE_REPORTS.extend(ray.get(reports.rows.remote()))
    return {name: (job, infos[name], read_metrics(storage.join(job.run_uri, "metrics.csv"))) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return runs["straight"]


# --------------------------------------------------------------------------------------------- preparation
def test_prepare_encodes_once_records_bad_clips_and_is_reused(prepared, manifest, tiny_backbone_dir):
    import pyarrow.parquet as pq

    from pipelines.prepare import prepare

    first, root = prepared
    assert not first.skipped and first.num_ok == len(EFFECTS) * CLIPS_PER_EFFECT and first.num_failed == 1
    info = json.loads(storage.read_bytes(storage.join(first.uri, "prepared.json")))
    assert info["num_frames"] == 9 and info["height"] == 32 and info["backbone"] == tiny_backbone_dir
    errors = pq.read_table(storage.join(first.uri, "errors.parquet")).to_pylist()
    assert [e["clip_id"] for e in errors] == ["broken"] and "broken.mp4" in errors[0]["error"]
    data = PreparedData.load(first.uri)
    assert len(data.index) == first.num_ok and sorted(set(data.effects)) == sorted(EFFECTS)
    ex = data.example(0)
    assert ex["latents"].shape == (4, 3, 8, 8) and ex["prompt_embeds"].shape == (16, 32)
    assert data.empty_prompt.shape == (16, 32)
    shard_files = {f: os.path.getmtime(f) for f in storage.list_files(storage.join(first.uri, "shards"))}
    assert shard_files and all(f.endswith(".safetensors") for f in shard_files)

    again = prepare(manifest, tiny_backbone_dir, root)  # same manifest content + backbone: reused, not recomputed
    assert again.skipped and again.uri == first.uri and again.seconds < 2
    assert {f: os.path.getmtime(f) for f in storage.list_files(storage.join(first.uri, "shards"))} == shard_files


def test_single_process_loop_lowers_the_loss(prepared, tiny_backbone_dir, tmp_path):
    from pipelines.train import model_config
    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for

    data = PreparedData.load(prepared[0].uri)
    backbone = Backbone.from_pretrained(tiny_backbone_dir, device="cpu")
    model = new_model_for(backbone, model_config(MODEL), seed=0)
    frozen = {k: v.clone() for k, v in backbone.transformer.state_dict().items()}
    before = eval_loss(model, backbone, data)
    rows = train_single_process(model, backbone, data, TrainConfig(**{**TRAIN, "lr": 3e-3}), max_steps=12,
                                batch_size=2, metrics_uri=str(tmp_path / "metrics.csv"))
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(r["samples_per_s"] > 0 for r in rows)
    assert eval_loss(model, backbone, data) < 0.9 * before
    from video2lora.lightlora import remove_lightlora

    remove_lightlora(backbone.transformer)
    after = backbone.transformer.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # the backbone never changes
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.csv"))] == list(range(1, 13))


# --------------------------------------------------------------------------------------------- Ray Train + ZeRO-2
def test_zero2_training_lowers_loss_partitions_state_and_trains_only_hypernet(uninterrupted, prepared, tiny_backbone_dir, ray_s3):
    from pipelines.train import model_config
    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for
    from video2lora.hypernet import Video2LoRAModel

    job, info, metrics = uninterrupted
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(np.isfinite(m["loss"]) and m["lr"] == TRAIN["lr"] and m["samples_per_s"] > 0 for m in metrics)

    # ZeRO-2: each rank holds about half of the fp32 master weights and of the AdamW moments
    total = info["trainable_params"]
    ranks = info["per_rank_optimizer_state"]
    assert info["world_size"] == 2 and info["zero_stage"] == 2 and info["compute_dtype"] == "torch.bfloat16"
    assert len(ranks) == 2
    for r in ranks:
        assert abs(r["master_numel"] - total / 2) <= 64
        assert r["moments_numel"] == 2 * r["master_numel"]  # exp_avg + exp_avg_sq of its partition only
    assert total <= sum(r["master_numel"] for r in ranks) <= total + 128

    # only the hypernetwork and aux matrices train: the backbone is bit-identical, the artifact changed everywhere
    assert info["backbone_trainable_params"] == 0
    assert info["backbone_components"] == ["transformer"]  # a worker holds the DiT only
    assert info["backbone_fingerprint_before"] == info["backbone_fingerprint_after"]
    trained = Video2LoRAModel.from_pretrained(job.output_uri)
    backbone = Backbone.from_pretrained(tiny_backbone_dir, device="cpu")
    initial = new_model_for(backbone, model_config(MODEL), seed=TRAIN["seed"])
    keys = set(trained.state_dict())
    assert keys == set(initial.state_dict())
    assert all(k.startswith(("hypernet.", "a_aux.", "b_aux.")) for k in keys)
    changed = [k for k in keys if not torch.equal(trained.state_dict()[k], initial.state_dict()[k])]
    assert len(changed) == len(keys)

    # the loss goes down (fixed timesteps/noise on the training clips, fp32 evaluation of the gathered weights)
    data = PreparedData.load(prepared[0].uri)
    from video2lora.training import prepare_backbone

    prepare_backbone(backbone, initial)
    assert eval_loss(trained, backbone, data) < 0.95 * eval_loss(initial, backbone, data)

    # the checkpoints on S3: the last few kept, every rank's partition as safetensors, the model loadable
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    ckpts = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/runs/straight") if "checkpoint-" in p)
    assert ckpts == ["checkpoint-000000004", "checkpoint-000000006"]
    files = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/runs/straight/checkpoint-000000006"))
    assert files == ["model", "rank-00000.safetensors", "rank-00001.safetensors", "train_state.json"]
    assert fs.cat(f"{BUCKET}/runs/straight/checkpoint-000000006/rank-00001.safetensors")[8:9] == b"{"
    Video2LoRAModel.from_pretrained(f"s3://{BUCKET}/runs/straight/checkpoint-000000006/model")

    # DeepSpeed compiled nothing
    assert os.listdir(ray_s3["torch_extensions"]) == []


def test_resume_from_s3_continues_with_the_same_losses(runs, prepared, tiny_backbone_dir):
    """3 steps, then the same command to 6 steps (resumes at 3) with a worker crash at step 5 (Ray Train restarts
    the workers from the step-4 checkpoint): steps 4-6 match the uninterrupted run."""
    from pipelines.train import run_training
    from video2lora.hypernet import Video2LoRAModel

    _, _, straight = runs["straight"]
    first, _, part = runs["resumed"]
    assert [m["step"] for m in part] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in part], [m["loss"] for m in straight[:3]], rtol=1e-5)

    again = job_config(prepared[0].uri, tiny_backbone_dir, f"s3://{BUCKET}/runs", "resumed", max_steps=6)
    again.fail_once_at_step = 5
    info = run_training(again)
    assert info["resumed_from_step"] == 4  # the restart after the crash resumed from the step-4 checkpoint
    resumed = read_metrics(storage.join(again.run_uri, "metrics.csv"))
    assert [m["step"] for m in resumed] == list(range(1, 7))
    np.testing.assert_allclose([m["loss"] for m in resumed[3:]], [m["loss"] for m in straight[3:]], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in resumed[3:]], [m["grad_norm"] for m in straight[3:]], rtol=1e-3)
    state = json.loads(storage.read_bytes(f"s3://{BUCKET}/runs/resumed/checkpoint-000000006/train_state.json"))
    assert state["step"] == 6 and state["samples_seen"] == 12 and (state["epoch"], state["offset"]) == (1, 4)
    a = Video2LoRAModel.from_pretrained(again.output_uri).state_dict()
    b = Video2LoRAModel.from_pretrained(runs["straight"][0].output_uri).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_settings_are_refused_before_starting(prepared, tiny_backbone_dir, tmp_path):
    from pipelines.train import deepspeed_config, run_training

    job = job_config(prepared[0].uri, tiny_backbone_dir, str(tmp_path), "x", mixed_precision="fp16")
    with pytest.raises(ValueError, match="fp16"):
        deepspeed_config(job)
    job = job_config(prepared[0].uri, tiny_backbone_dir, str(tmp_path), "x", batch_size=8)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run_training(job)


def test_cli_defaults_and_flags():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "jobs", "train.py"))
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)

    a = train_cli.parse_args([])
    assert a.manifest == "" and a.num_workers == 2 and not a.use_gpu and a.lr == 1e-5 and a.batch_size == 1
    a = train_cli.parse_args(["--manifest", "s3://b/m.parquet", "--backbone", "s3://b/bb", "--storage-path", "s3://b/runs",
                              "--output", "s3://b/model", "--num-workers", "8", "--use-gpu", "--max-steps", "100",
                              "--batch-size", "2", "--checkpoint-every", "10", "--keep-checkpoints", "2", "--lr", "1e-4"])
    assert (a.num_workers, a.use_gpu, a.max_steps, a.batch_size, a.checkpoint_every, a.keep_checkpoints, a.lr) == (
        8, True, 100, 2, 10, 2, 1e-4)
    # a --model-config typo or non-JSON stops the job on the driver with the field named (exit 2)
    for bad, words in (('{"hyper": {"widht": 96}}', "widht"), ("{hyper: 96}", "not JSON"), ("[1]", "JSON object")):
        with pytest.raises(ValueError, match=words):
            train_cli.build_job(train_cli.parse_args(["--model-config", bad]))


# --------------------------------------------------------------------------------------------- warm start
def test_warm_start_learns_effect_loras_and_seeds_zero2_training(prepared, manifest, tiny_backbone_dir, ray_s3, tmp_path,
                                                                 capsys):
    """jobs/pretrain_hypernet.py: per-effect LoRAs that beat no LoRA on their own clips, a hypernetwork regressed
    onto them; then a ZeRO-2 run with --init-checkpoint starts from exactly those weights (lr 0 keeps them)."""
    import sys

    from safetensors.torch import load_file

    from pipelines.train import run_training
    from video2lora.hypernet import Video2LoRAModel

    sys.path.insert(0, os.path.join(REPO, "jobs"))
    import pretrain_hypernet

    out = str(tmp_path / "warm")
    model_cfg = {"hyper": {**MODEL["hyper"], "stem_channels": 8}}
    assert pretrain_hypernet.main(["--prepared", prepared[0].uri, "--backbone", tiny_backbone_dir, "--output", out,
                                   "--model-config", json.dumps(model_cfg), "--table-steps", "40", "--table-lr", "1e-2",
                                   "--table-batch-size", "4", "--regress-steps", "150", "--regress-batch-size", "8",
                                   "--eval-rows", "8"]) == 0
    # a root instead of a preparation: with the manifest it prepares into it (here: finds the same preparation)
    again = str(tmp_path / "warm-from-manifest")
    assert pretrain_hypernet.main(["--prepared", prepared[1], "--manifest", manifest, "--backbone", tiny_backbone_dir,
                                   "--output", again, "--model-config", json.dumps(model_cfg), "--table-steps", "2",
                                   "--regress-steps", "2", "--eval-rows", "2"]) == 0
    assert json.loads(open(os.path.join(again, "warmstart.json")).read())["args"]["prepared"] == prepared[0].uri
    assert pretrain_hypernet.main(["--prepared", str(tmp_path / "nothing"), "--backbone", tiny_backbone_dir,
                                   "--output", str(tmp_path / "x")]) == 2  # no preparation, no manifest: refused
    assert pretrain_hypernet.main(["--prepared", prepared[0].uri, "--backbone", tiny_backbone_dir, "--output",
                                   str(tmp_path / "x"), "--model-config", '{"hyper": {"widht": 3}}']) == 2  # typo
    assert not os.path.exists(tmp_path / "x")
    report = json.loads(open(os.path.join(out, "warmstart.json")).read())
    assert report["groups"] == sorted(EFFECTS)
    table = report["effect_losses"]["table"]
    assert table["own_effect"] < table["none"]  # the fitted per-effect LoRAs help on their own clips
    fit = report["regression"][-1]["fit"]
    first = report["regression"][0]["fit"]
    assert fit["relative_error"] < 0.5 * first["relative_error"]  # the hypernetwork learned to predict them
    tables = load_file(os.path.join(out, "lora_tables.safetensors"))
    warm = Video2LoRAModel.from_pretrained(out)
    assert tables["a_pred"].shape[:2] == (len(EFFECTS), len(warm.config.layers))
    assert warm.config.hyper.stem_channels == 8
    # --tables-from: another hypernetwork regressed onto these very tables (fitted once); refused: another LoRA
    # shape (the motion stream at rank 2), no warm start there, a factorisation the labels do not have
    other = str(tmp_path / "warm-again")
    assert pretrain_hypernet.main(["--prepared", prepared[0].uri, "--backbone", tiny_backbone_dir, "--output", other,
                                   "--model-config", json.dumps({**model_cfg, "lora": {"rank": 2}, "hyper": {
                                       **model_cfg["hyper"], "motion_stream": True}}),
                                   "--tables-from", out, "--regress-steps", "2", "--eval-rows", "2"]) == 2  # rank 2 != 1
    assert "LoRA rank, down, up or alpha" in capsys.readouterr().err
    assert pretrain_hypernet.main(["--prepared", prepared[0].uri, "--backbone", tiny_backbone_dir, "--output", other,
                                   "--model-config", json.dumps(model_cfg), "--tables-from", str(tmp_path / "none"),
                                   "--regress-steps", "2", "--eval-rows", "2"]) == 2  # nothing there
    assert "warmstart.json" in capsys.readouterr().err
    assert pretrain_hypernet.main(["--prepared", prepared[0].uri, "--backbone", tiny_backbone_dir, "--output", other,
                                   "--model-config", json.dumps({**model_cfg, "lora": {"rank": 2}}), "--tables-from", out,
                                   "--factorise", "--regress-steps", "2", "--eval-rows", "2"]) == 2  # fitted without
    assert "no factorised table; run without --factorise" in capsys.readouterr().err
    assert not os.path.exists(other)
    assert pretrain_hypernet.main(["--prepared", prepared[0].uri, "--backbone", tiny_backbone_dir, "--output", other,
                                   "--model-config", json.dumps(model_cfg), "--tables-from", out, "--seed", "1",
                                   "--regress-steps", "2", "--eval-rows", "2"]) == 0
    assert load_file(os.path.join(other, "lora_tables.safetensors")).keys() == tables.keys()
    for k, v in load_file(os.path.join(other, "lora_tables.safetensors")).items():
        assert torch.equal(v, tables[k]), k
    again = Video2LoRAModel.from_pretrained(other)
    for k, v in warm.state_dict().items():  # the aux matrices fitted with the tables, the hypernetwork its own
        assert torch.equal(again.state_dict()[k], v) == ("aux" in k), k
    assert json.loads(open(os.path.join(other, "warmstart.json")).read())["table"] == report["table"]

    # bf16 compute: the fp32 master weights must still start as the warm start's fp32 weights, not a bf16 rounding
    job = job_config(prepared[0].uri, tiny_backbone_dir, str(tmp_path / "runs"), "from-warm", max_steps=2, lr=0.0,
                     weight_decay=0.0, mixed_precision="bf16")
    job.init_checkpoint = out
    info = run_training(job)
    trained = Video2LoRAModel.from_pretrained(info["output"])
    assert trained.config == warm.config
    for k, v in warm.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[k], v, atol=0, rtol=0)
