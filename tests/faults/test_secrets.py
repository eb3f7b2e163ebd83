"""AWS keys (in the environment, or pasted into URLs by a manifest's author) never reach logs, results or errors."""

import logging
import os

import pytest

from faults.helpers import ACCESS_KEY, BUCKET, SECRET_KEY, check_final_states, job_config, results_table, write_manifest
from pipelines.batch import SetupError, check_artifacts, run_batch_job
from pipelines.manifest import ManifestError, read_manifest
from video2lora import storage

# credentials a manifest's author pasted into URLs (not those of the environment)
OTHER_KEY, OTHER_SECRET = "AKIAOTHERPASTED00042", "pAsTeD/sEcReT+9kQ2wX7vB3nM5zL1"
SIGNATURE = "5ec2e7519a7a7e0fdeadbeef0123456789abcdef0123456789abcdef01234567"
SECRETS = [ACCESS_KEY, SECRET_KEY, OTHER_KEY, OTHER_SECRET, SIGNATURE, "pAsTeD", "wJ9xQ2vT7"]


def _assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} appears in {where}: ...{text[max(0, text.find(secret) - 200):][:400]}..."


def test_no_secret_in_results_logs_or_errors(ray_cluster, s3_proxy, s3_server, tiny_backbone_dir, checkpoint, clips,
                                             tmp_path, caplog):
    import boto3

    caplog.set_level(logging.INFO)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=BUCKET, Key="secrets/ref.mp4", Body=open(clips[0], "rb").read())
    s3_proxy.denied = [("GET", f"/{BUCKET}/secrets/denied")]
    presigned = (f"{s3_proxy.endpoint}/{BUCKET}/secrets/denied.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 f"&X-Amz-Credential={OTHER_KEY}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={SIGNATURE}")
    rows = [
        {"sample_id": "good", "reference_uri": f"s3://{BUCKET}/secrets/ref.mp4", "prompt": "a red circle"},
        {"sample_id": "env_keys_in_url", "reference_uri": f"s3://{ACCESS_KEY}:{SECRET_KEY}@{BUCKET}/secrets/ref.mp4",
         "prompt": "x"},
        {"sample_id": "pasted_keys_in_url", "reference_uri": f"s3://{OTHER_KEY}:{OTHER_SECRET}@{BUCKET}/secrets/ref.mp4",
         "prompt": "x"},
        {"sample_id": "keys_in_image_url", "reference_uri": f"s3://{BUCKET}/secrets/ref.mp4", "prompt": "x",
         "image_uri": f"https://{OTHER_KEY}:{OTHER_SECRET}@example.com/first.png"},
        {"sample_id": "presigned_denied", "reference_uri": presigned, "prompt": "x"},
        {"sample_id": "s3_denied", "reference_uri": f"s3://{BUCKET}/secrets/denied.mp4", "prompt": "x"},
        {"sample_id": "no_bucket", "reference_uri": "s3://no-such-bucket-v2l/ref.mp4", "prompt": "x"},
    ]
    out = f"s3://{BUCKET}/secrets/out"
    summary = run_batch_job(write_manifest(tmp_path / "m.parquet", rows), job_config(tiny_backbone_dir, checkpoint, out),
                            progress=False)
    res = check_final_states(results_table(out), [r["sample_id"] for r in rows])
    assert res.loc["good", "status"] == "ok" and summary["failed"] == len(rows) - 1, res.error.to_dict()
    # the reasons stay useful without the secrets
    for sid in ("env_keys_in_url", "pasted_keys_in_url"):
        assert "reference_uri has credentials in it" in res.loc[sid, "error"]
    assert "image_uri has credentials in it" in res.loc["keys_in_image_url", "error"]
    assert "secrets/denied.mp4" in res.loc["presigned_denied", "error"]
    assert "X-Amz-Signature=***" in res.loc["presigned_denied", "error"]
    assert "secrets/denied.mp4" in res.loc["s3_denied", "error"] and "PermissionError" in res.loc["s3_denied", "error"]
    assert "no-such-bucket-v2l/ref.mp4" in res.loc["no_bucket", "error"]

    _assert_clean(res.reset_index().astype(str).to_csv(), "the results table")
    _assert_clean(str(summary), "the job summary")
    _assert_clean("\n".join(r.getMessage() for r in caplog.records), "the driver's log")
    # every log of the Ray instance: the workers that read, decoded and wrote, for this and earlier jobs
    logs = 0
    for d, _, files in os.walk(ray_cluster):
        for f in files:
            if f.endswith((".log", ".out", ".err")):
                _assert_clean(open(os.path.join(d, f), "rb").read().decode("utf-8", "replace"), os.path.join(d, f))
                logs += 1
    assert logs > 0


def test_no_secret_in_setup_errors(s3_proxy, tiny_backbone_dir, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 1)
    errors = []
    for uri in (f"s3://{OTHER_KEY}:{OTHER_SECRET}@{BUCKET}/m.parquet", f"s3://{ACCESS_KEY}:{SECRET_KEY}@{BUCKET}/m.parquet"):
        with pytest.raises(ManifestError) as e:
            read_manifest(uri)
        errors.append(str(e.value))
        with pytest.raises(storage.StorageError) as e:
            storage.read_bytes(uri)
        errors.append(str(e.value))
        with pytest.raises(storage.StorageError) as e:
            storage.write_bytes_atomic(uri, b"x")
        errors.append(str(e.value))
    for ckpt in (f"s3://{OTHER_KEY}:{OTHER_SECRET}@{BUCKET}/ckpt", f"s3://{BUCKET}/ckpt?X-Amz-Signature={SIGNATURE}"):
        with pytest.raises(SetupError) as e:
            check_artifacts(job_config(tiny_backbone_dir, ckpt, tmp_path / "out"))
        errors.append(str(e.value))
    for text in errors:
        _assert_clean(text, "an error message")
    assert all("***" in text or "has credentials in it" in text for text in errors), errors  # still says why
