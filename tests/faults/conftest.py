"""Fixtures of the fault tests: one local Ray instance for the package, its S3 traffic through a fault proxy."""

import os
import shutil
import tempfile

import pytest
from conftest import patched_env, save_model_for, write_clips

from faults.helpers import ACCESS_KEY, BUCKET, SECRET_KEY, FaultProxy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="package")
def s3_proxy(s3_server):
    """The moto server behind a fault-injecting proxy; the AWS env (with distinctive fake keys) points at it."""
    import boto3

    proxy = FaultProxy(s3_server).start()
    env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    try:
        with patched_env(env):
            boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
            yield proxy
    finally:
        proxy.stop()


@pytest.fixture(autouse=True)
def _proxy_reset(request):
    yield
    if "s3_proxy" in request.fixturenames:
        request.getfixturevalue("s3_proxy").reset()


@pytest.fixture(scope="package")
def ray_cluster(s3_proxy):
    """A fresh local Ray instance (never someone else's: address="local") with its own temp dir, so the
    tests can read every log it wrote. Its processes inherit the proxy's AWS env."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    saved_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, saved_path) if p)  # Ray Train workers import pipelines/
    temp_dir = tempfile.mkdtemp(prefix="v2lf-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path


@pytest.fixture(scope="package")
def checkpoint(tiny_backbone_dir, tmp_path_factory):
    return save_model_for(tiny_backbone_dir, str(tmp_path_factory.mktemp("fault-ckpt")))


@pytest.fixture(scope="package")
def clips(tmp_path_factory):
    """Three small reference clips (local paths)."""
    return write_clips(tmp_path_factory.mktemp("fault-clips"), 3, seed=21)

