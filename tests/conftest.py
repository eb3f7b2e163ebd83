import contextlib
import os
import socket

import pytest


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's own shutdown once pytest is done (summary printed, every plugin
    unconfigured): on a lone clone a run whose 252 tests passed then died in that shutdown with a segmentation fault
    (exit 139; native threads of Ray / gRPC / torch torn down in the wrong order), which would fail CI for nothing.
    pytest's exit status is kept."""
    if _EXIT_STATUS and os.environ.get("VIDEO2LORA_PYTEST_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def _clear_fsspec_s3_cache():
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def patched_env(env: dict):
    """Set (value) or unset (None) environment variables for the block, then restore them; s3fs's cached clients
    are dropped on both sides, since they hold the endpoint and keys of the env they were made in."""
    def apply(values: dict) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fsspec_s3_cache()

    saved = {k: os.environ.get(k) for k in env}
    apply(env)
    try:
        yield
    finally:
        apply(saved)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on localhost; yields its endpoint URL with the AWS env pointed at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
    }
    try:
        with patched_env(env):
            yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A tiny seeded CogVideoX text-to-video pipeline saved as a diffusers directory."""
    from video2lora.presets import save_preset

    return save_preset("tiny-cogvideox", str(tmp_path_factory.mktemp("tiny-cogvideox")), seed=0)


@pytest.fixture(scope="session")
def tiny_i2v_backbone_dir(tmp_path_factory):
    from video2lora.presets import save_preset

    return save_preset("tiny-cogvideox-i2v", str(tmp_path_factory.mktemp("tiny-cogvideox-i2v")), seed=0)


def make_model(backbone, seed=0, head_std=0.05):
    """A seeded Video2LoRA model with a head large enough that LoRAs visibly change outputs."""
    import torch

    from video2lora.generate import new_model_for

    model = new_model_for(backbone, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.hypernet.head.weight.copy_(torch.randn(model.hypernet.head.weight.shape, generator=g) * head_std)
    return model


def random_clips(n, frames=9, size=32, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, frames, size, size, generator=g) * 2 - 1 for _ in range(n)]


def save_model_for(backbone_dir: str, path: str) -> str:
    """A seeded Video2LoRA checkpoint (make_model) for the backbone in backbone_dir, saved to path."""
    from video2lora.backbones import Backbone

    make_model(Backbone.from_pretrained(backbone_dir, device="cpu")).save_pretrained(path)
    return path


def write_clips(directory, n: int, seed: int) -> list[str]:
    """n random reference clips as mp4 files ref0.mp4 ... in directory."""
    from video2lora.video_io import write_video

    paths = []
    for i, clip in enumerate(random_clips(n, seed=seed)):
        paths.append(os.path.join(str(directory), f"ref{i}.mp4"))
        write_video(paths[-1], clip)
    return paths
