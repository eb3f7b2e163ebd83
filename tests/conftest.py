import os
import socket

import pytest


def _clear_fsspec_s3_cache():
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


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
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _clear_fsspec_s3_cache()  # s3fs caches clients created before the env was set
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fsspec_s3_cache()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A tiny seeded CogVideoX text-to-video pipeline saved as a diffusers directory."""
    from video2lora.tiny import save_tiny

    return save_tiny("tiny-cogvideox", str(tmp_path_factory.mktemp("tiny-cogvideox")), seed=0)


@pytest.fixture(scope="session")
def tiny_i2v_backbone_dir(tmp_path_factory):
    from video2lora.tiny import save_tiny

    return save_tiny("tiny-cogvideox-i2v", str(tmp_path_factory.mktemp("tiny-cogvideox-i2v")), seed=0)


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
