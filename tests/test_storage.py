import json
import os

import pytest

from video2lora import storage


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY", 0.0)


def test_write_bytes_atomic_local(tmp_path):
    uri = str(tmp_path / "a" / "b" / "out.bin")
    storage.write_bytes_atomic(uri, b"first")
    storage.write_bytes_atomic(uri, b"second")
    assert storage.read_bytes(uri) == b"second"
    assert os.listdir(tmp_path / "a" / "b") == ["out.bin"]  # no temp files left behind


def test_write_bytes_atomic_failure_leaves_old_file(tmp_path, monkeypatch):
    uri = str(tmp_path / "out.bin")
    storage.write_bytes_atomic(uri, b"old")

    def broken_replace(src, dst):
        raise PermissionError("nope")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(storage.StorageError, match="out.bin"):
        storage.write_bytes_atomic(uri, b"new")
    assert os.listdir(tmp_path) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_read_bytes_errors(tmp_path):
    with pytest.raises(storage.StorageError, match="missing.bin"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100)
    assert storage.read_bytes(str(big), max_bytes=100) == b"x" * 100
    with pytest.raises(storage.StorageError, match="big.bin.*max_bytes=99"):
        storage.read_bytes(str(big), max_bytes=99)


def test_exists_join_list_remove(tmp_path):
    base = str(tmp_path)
    for name in ["b.mp4", "a.mp4", "c.txt"]:
        storage.write_bytes_atomic(storage.join(base, name), b"x")
    os.mkdir(tmp_path / "sub.mp4")
    assert storage.list_files(base, suffix=".mp4") == [storage.join(base, "a.mp4"), storage.join(base, "b.mp4")]
    assert len(storage.list_files(base)) == 3
    assert storage.list_files(storage.join(base, "nope")) == []
    assert storage.exists(storage.join(base, "a.mp4"))
    storage.remove(storage.join(base, "a.mp4"))
    storage.remove(storage.join(base, "a.mp4"))  # idempotent
    assert not storage.exists(storage.join(base, "a.mp4"))
    assert storage.join("s3://bucket/prefix/", "x", "/y.mp4") == "s3://bucket/prefix/x/y.mp4"


@pytest.mark.parametrize("name", ["../../etc/x", "/abs/path", "a/b", "a\\b", "..", ".", "", "a\x00b", "x" * 201, 7])
def test_safe_child_rejects(name):
    with pytest.raises(ValueError, match="unsafe name"):
        storage.safe_child("s3://bucket/out", name)


def test_safe_child_accepts(tmp_path):
    assert storage.safe_child("s3://bucket/out/", "row_001") == "s3://bucket/out/row_001"
    assert storage.safe_child(str(tmp_path), "clip-1.v2") == str(tmp_path / "clip-1.v2")


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    text = storage.redact(
        "failed s3://AKIAEXAMPLE:wJalr/XUt@bucket/key and "
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc123&x=1 "
        "key=AKIAEXAMPLE secret=wJalrXUtnFEMI/K7MDENG"
    )
    for secret in ["AKIAEXAMPLE", "wJalr", "abc123", "AKIA%2F"]:
        assert secret not in text
    assert "s3://***@bucket/key" in text and "X-Amz-Signature=***" in text and "&x=1" in text
    assert storage.redact("s3://bucket/path@v1/file.mp4") == "s3://bucket/path@v1/file.mp4"


def test_retry_transient_then_raise():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert storage.retry(flaky, attempts=5) == "ok"
    assert len(calls) == 3

    calls.clear()

    def always_down():
        calls.append(1)
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        storage.retry(always_down, attempts=4)
    assert len(calls) == 4


@pytest.mark.parametrize("error", [FileNotFoundError, PermissionError, ValueError])
def test_retry_permanent_errors_not_retried(error):
    calls = []

    def fail():
        calls.append(1)
        raise error("permanent")

    with pytest.raises(error):
        storage.retry(fail, attempts=5)
    assert len(calls) == 1


def test_local_copy_local_dir(tmp_path):
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)


def test_content_hash():
    assert storage.content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_s3_roundtrip(s3_server, tmp_path):
    import boto3

    boto3.client("s3").create_bucket(Bucket="v2l-storage")
    base = "s3://v2l-storage/model"
    storage.write_bytes_atomic(storage.join(base, "model_index.json"), b"{}")
    storage.write_bytes_atomic(storage.join(base, "vae", "config.json"), b'{"a": 1}')
    storage.write_bytes_atomic("s3://v2l-storage/model2/other.json", b"not part of model/")
    assert storage.read_bytes(storage.join(base, "vae", "config.json")) == b'{"a": 1}'
    assert storage.exists(storage.join(base, "model_index.json"))
    assert not storage.exists(storage.join(base, "nope.json"))
    assert storage.list_files(base) == [storage.join(base, "model_index.json")]
    assert storage.list_files(base, suffix=".bin") == []
    with pytest.raises(storage.StorageError, match="s3://v2l-storage/model/nope.json"):
        storage.read_bytes(storage.join(base, "nope.json"))
    with pytest.raises(storage.StorageError, match="max_bytes=7"):
        storage.read_bytes(storage.join(base, "vae", "config.json"), max_bytes=7)

    cache = str(tmp_path / "cache")
    local = storage.local_copy(base, cache_dir=cache)
    assert open(os.path.join(local, "vae", "config.json"), "rb").read() == b'{"a": 1}'
    assert os.path.exists(os.path.join(local, ".complete"))
    assert os.listdir(cache) == [os.path.basename(local)]  # no partial dirs left behind
    assert sorted(os.listdir(local)) == [".complete", "model_index.json", "vae"]
    assert storage.local_copy(base + "/", cache_dir=cache) == local  # cached

    storage.remove(storage.join(base, "vae", "config.json"))
    storage.remove(storage.join(base, "vae", "config.json"))
    assert not storage.exists(storage.join(base, "vae", "config.json"))


def test_local_copy_redone_after_crash(tmp_path, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/crashy/a.txt": b"a", "/crashy/sub/b.txt": b"b"})
    cache = str(tmp_path / "cache")

    def dies(*args, **kwargs):
        raise ConnectionResetError("connection died mid-download")

    with monkeypatch.context() as m:
        m.setattr(type(fs), "get", dies)
        with pytest.raises(storage.StorageError, match="memory://crashy"):
            storage.local_copy("memory://crashy", cache_dir=cache)
    assert os.listdir(cache) == []  # the partial download was discarded

    local = storage.local_copy("memory://crashy", cache_dir=cache)
    assert open(os.path.join(local, "sub", "b.txt"), "rb").read() == b"b"


COPY_WORKER = """
import asyncio, json, sys, time
import s3fs
from video2lora import storage

counter, cache, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
real_get = s3fs.S3FileSystem._get

async def counting_get(self, *args, **kwargs):  # every download this process makes, on record
    with open(counter, "a") as f:
        f.write("copy\\n")
    await asyncio.sleep(0.5)  # a slow download: the others start while it runs
    return await real_get(self, *args, **kwargs)

s3fs.S3FileSystem._get = counting_get  # before any instance mirrors it into its sync `get`
while time.time() < start_at:
    time.sleep(0.01)
print(json.dumps(storage.local_copy("s3://v2l-locks/model", cache_dir=cache)))
"""


def test_concurrent_copies_of_one_backbone_make_exactly_one(s3_server, tmp_path):
    """Four processes (actors on one node) ask for the same remote backbone at the same moment: one downloads,
    the others wait for it and reuse its copy."""
    import subprocess
    import sys
    import time

    import boto3

    boto3.client("s3").create_bucket(Bucket="v2l-locks")
    for name in ("model_index.json", "transformer/config.json", "vae/config.json"):
        storage.write_bytes_atomic(f"s3://v2l-locks/model/{name}", name.encode())
    counter, cache = str(tmp_path / "copies.txt"), str(tmp_path / "cache")
    start_at = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", COPY_WORKER, counter, cache, start_at], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    paths = {json.loads(p.communicate(timeout=120)[0]) for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert open(counter).read().splitlines() == ["copy"]  # exactly one download
    (local,) = paths  # and every process got the same complete copy
    assert open(os.path.join(local, "vae", "config.json"), "rb").read() == b"vae/config.json"
    assert os.listdir(cache) == [os.path.basename(local)]
