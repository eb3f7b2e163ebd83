"""Faults in the batch job: a generation actor killed, the driver killed, S3 failing. Nothing lost, nothing twice."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from faults.helpers import (
    ACCESS_KEY, BUCKET, SECRET_KEY, check_final_states, job_config, partial_files, results_table, write_manifest,
)
from pipelines.batch import run_batch_job
from video2lora.video_io import read_video

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _busy_generation_actor() -> int | None:
    """PID of a generation actor of this process's Ray instance that is running a batch right now."""
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "MapBatches(GenerateStage)" in title and ".submit" in title:  # Ray's title while a task runs
            return p.pid
    return None


def _job_workers() -> list[int]:
    """Worker processes of this Ray instance busy with a batch-job stage (no job of this process runs now)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and ("MapBatches(" in title or "MapWorker(" in title):
            out.append(p.pid)
    return out


def _videos(out) -> dict[str, int]:
    return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "videos", "*.mp4"))}


def _check_videos(out, ids):
    assert sorted(_videos(out)) == sorted(f"{i}.mp4" for i in ids), "one mp4 per finished row, no other"
    for i in ids:  # whole, decodable files
        assert read_video(os.path.join(out, "videos", f"{i}.mp4"), 9, 32, 32).shape == (3, 9, 32, 32)


def test_generation_actor_killed_mid_batch(ray_cluster, tiny_backbone_dir, checkpoint, clips, tmp_path):
    ids = [f"k{i:02d}" for i in range(6)]
    rows = [{"sample_id": s, "reference_uri": clips[i % 3], "prompt": "a red circle", "seed": i, "steps": 8}
            for i, s in enumerate(ids)]  # more steps: a batch takes a few seconds
    out = str(tmp_path / "out")
    cfg = job_config(tiny_backbone_dir, checkpoint, out, export_loras=True)
    outcome = {}

    def job():
        try:
            outcome["summary"] = run_batch_job(write_manifest(tmp_path / "m.parquet", rows), cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            outcome["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    pid = _wait_for(lambda: _busy_generation_actor() or (not thread.is_alive() and -1), 400, "a busy generation actor")
    assert pid != -1, f"the job ended before its generation actor was seen at work: {outcome}"
    os.kill(pid, signal.SIGKILL)  # mid-batch: Ray titles the process ...submit only while it runs a batch
    thread.join(timeout=400)
    assert not thread.is_alive(), "the job did not finish after its generation actor was killed"
    assert "error" not in outcome, outcome.get("error")

    summary = outcome["summary"]
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (len(ids), 0, 0), summary
    res = check_final_states(results_table(out), ids)
    assert (res.status == "ok").all()
    _check_videos(out, ids)
    assert sorted(os.listdir(os.path.join(out, "rows"))) == sorted(f"{i}.json" for i in ids)
    assert sorted(os.listdir(os.path.join(out, "loras"))) == sorted(f"{i}.safetensors" for i in ids)
    assert partial_files(out) == []


def _job_command(manifest, out, backbone, checkpoint):
    return [sys.executable, os.path.join(REPO, "jobs", "batch_generate.py"), manifest, "--output", out,
            "--backbone", backbone, "--checkpoint", checkpoint, "--quiet", "--batch-size", "2",
            "--actor-num-cpus", "0.25", "--num-frames", "9", "--height", "32", "--width", "32", "--steps", "2"]


def _job_env():
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def test_driver_killed_then_same_command_again(ray_cluster, tiny_backbone_dir, checkpoint, clips, tmp_path):
    """SIGKILL the job's driver mid-job (the cluster lives on, as under `ray job submit`); the same command then
    does the rest only."""
    import ray

    ids = [f"d{i:02d}" for i in range(8)]
    rows = [{"sample_id": s, "reference_uri": clips[i % 3], "prompt": "a blue square", "seed": i, "steps": 6}
            for i, s in enumerate(ids)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = str(tmp_path / "out")
    cmd = _job_command(manifest, out, tiny_backbone_dir, checkpoint)
    cmd += ["--ray-address", ray.get_runtime_context().gcs_address]
    with open(tmp_path / "run1.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=_job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: _videos(out) or proc.poll() is not None, 400, "the first video")
            assert proc.poll() is None, "the job finished before it could be killed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started itself
            proc.wait(timeout=60)
    # Ray ends the dead driver's tasks and actors; look at the output only once they are gone
    _wait_for(lambda: not _job_workers(), 120, "the killed job's workers to go")
    done_first = sorted(f[: -len(".json")] for f in os.listdir(os.path.join(out, "rows")))
    first = _videos(out)
    assert len(done_first) < len(ids), done_first
    # a write the kill interrupted leaves a temporary file behind; plant one so the test never depends on luck
    with open(os.path.join(out, "videos", f".{ids[-1]}.mp4.0badc0de.tmp"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypisom")

    again = subprocess.run(cmd, env=_job_env(), capture_output=True, timeout=500)
    text = again.stdout.decode() + again.stderr.decode()
    assert again.returncode == 0, text[-3000:]
    for secret in (ACCESS_KEY, SECRET_KEY):  # the driver had them in its environment
        assert secret not in text and secret not in (tmp_path / "run1.log").read_text(errors="replace")
    summary = json.loads(next(line for line in again.stdout.decode().splitlines() if line.startswith("{")))
    assert summary["skipped"] == len(done_first) and summary["ok"] == len(ids) - len(done_first), summary
    assert summary["failed"] == 0
    res = check_final_states(results_table(out), ids)
    assert sorted(res.index[res.status == "skipped"]) == done_first
    assert set(res.status) <= {"ok", "skipped"}
    for sid in done_first:  # finished work is not redone
        assert _videos(out)[f"{sid}.mp4"] == first[f"{sid}.mp4"], sid
    _check_videos(out, ids)
    assert partial_files(out) == []


def test_s3_outage_and_permanent_failures(ray_cluster, s3_proxy, s3_server, tiny_backbone_dir, checkpoint, clips):
    """S3 drops connections and answers 503 for a while, once during reads and once during writes: reads and writes
    retry and every row finishes. Keys that are denied or missing fail only their own rows, with the reason."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)  # around the proxy, for setup and checks
    base = f"s3://{BUCKET}/outage"
    for i, path in enumerate(clips):
        s3.put_object(Bucket=BUCKET, Key=f"outage/refs/ref{i}.mp4", Body=open(path, "rb").read())
    s3.put_object(Bucket=BUCKET, Key="outage/denied/ref.mp4", Body=open(clips[0], "rb").read())
    good = [f"g{i}" for i in range(6)]
    rows = [{"sample_id": s, "reference_uri": f"refs/ref{i % 3}.mp4", "prompt": "a red circle", "seed": i}
            for i, s in enumerate(good)]
    rows += [{"sample_id": "denied_read", "reference_uri": "denied/ref.mp4", "prompt": "x"},
             {"sample_id": "missing_ref", "reference_uri": "refs/nope.mp4", "prompt": "x"},
             {"sample_id": "denied_write", "reference_uri": "refs/ref1.mp4", "prompt": "x"}]
    import io

    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    s3.put_object(Bucket=BUCKET, Key="outage/manifest.parquet", Body=buf.getvalue())

    out = f"{base}/out"
    s3_proxy.denied = [("GET", f"/{BUCKET}/outage/denied/"), ("PUT", f"/{BUCKET}/outage/out/videos/denied_write.mp4")]
    s3_proxy.triggers = [("GET", f"/{BUCKET}/outage/refs/ref", 4.0), ("PUT", f"/{BUCKET}/outage/out/videos/", 4.0)]
    summary = run_batch_job(f"{base}/manifest.parquet", job_config(tiny_backbone_dir, checkpoint, out), progress=False)

    assert len(s3_proxy.fired) == 2, s3_proxy.fired  # both outages happened, during a read and during a write
    assert s3_proxy.faulted >= 2 and s3_proxy.after_outage > 0
    assert (summary["ok"], summary["failed"]) == (len(good), 3), summary
    res = check_final_states(results_table(out), good + ["denied_read", "missing_ref", "denied_write"])
    assert (res.loc[good, "status"] == "ok").all()
    assert "outage/denied/ref.mp4" in res.loc["denied_read", "error"] and "PermissionError" in res.loc["denied_read", "error"]
    assert "refs/nope.mp4" in res.loc["missing_ref", "error"] and "not found" in res.loc["missing_ref", "error"]
    err = res.loc["denied_write", "error"]
    assert "cannot write" in err and "videos/denied_write.mp4" in err and "PermissionError" in err
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="outage/out/videos/").get("Contents", [])
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == sorted(f"{s}.mp4" for s in good)
    puts = s3_proxy.puts
    for s in good:  # each video was uploaded exactly once: the outage made no row run twice
        assert puts[f"/{BUCKET}/outage/out/videos/{s}.mp4"] == 1, (s, puts)
