import io

import pytest
import torch
from PIL import Image

from video2lora import video_io
from video2lora.video_io import VideoReadError


def moving_gradient(frames=9, height=32, width=32):
    """(3, F, H, W) in [-1, 1]: smooth gradients that shift with time."""
    t = torch.arange(frames).view(frames, 1, 1) / frames
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    shape = (frames, height, width)
    red = torch.sin(torch.pi * (x + t)).expand(shape)
    green = torch.cos(torch.pi * (y - t)).expand(shape)
    blue = (x * y + 0 * t).expand(shape) * 2 - 1
    return torch.stack([red, green, blue]) * 0.8


def index_clip(frames=20, size=16):
    """Flat gray frames whose brightness encodes the frame index."""
    levels = torch.linspace(-0.9, 0.9, frames)
    return levels.view(1, frames, 1, 1).expand(3, frames, size, size).contiguous(), levels


def test_roundtrip():
    video = moving_gradient()
    data = video_io.encode_video(video, fps=8)
    assert data[4:8] == b"ftyp"
    assert video_io.probe_video(data, "clip.mp4") == dict(width=32, height=32, frames=9, fps=8.0)
    decoded = video_io.decode_video(data, "clip.mp4", num_frames=9, height=32, width=32)
    assert decoded.shape == (3, 9, 32, 32) and decoded.dtype == torch.float32
    assert (decoded - video).abs().mean() < 0.05


def test_write_read_video(tmp_path):
    video = moving_gradient()
    uri = str(tmp_path / "out" / "clip.mp4")
    video_io.write_video(uri, video)
    decoded = video_io.read_video(uri, 9, 32, 32)
    assert (decoded - video).abs().mean() < 0.05


def test_uniform_sampling_spans_clip():
    clip, levels = index_clip(frames=20)
    data = video_io.encode_video(clip)
    out = video_io.decode_video(data, "idx.mp4", num_frames=9, height=16, width=16)
    brightness = out.mean(dim=(0, 2, 3))
    picked = (brightness.view(-1, 1) - levels.view(1, -1)).abs().argmin(dim=1).tolist()
    assert picked == video_io.sample_indices(20, 9)
    assert picked[0] == 0 and picked[-1] == 19 and picked == sorted(set(picked))


def test_short_clip_repeats_frames():
    clip, levels = index_clip(frames=4)
    out = video_io.decode_video(video_io.encode_video(clip), "short.mp4", num_frames=9, height=16, width=16)
    brightness = out.mean(dim=(0, 2, 3))
    picked = (brightness.view(-1, 1) - levels.view(1, -1)).abs().argmin(dim=1).tolist()
    assert len(picked) == 9 and picked[0] == 0 and picked[-1] == 3 and picked == sorted(picked)


def test_resize_center_crop_and_range():
    video = moving_gradient(frames=5, height=32, width=48)
    data = video_io.encode_video(video)
    out = video_io.decode_video(data, "wide.mp4", num_frames=3, height=24, width=24)
    assert out.shape == (3, 3, 24, 24)
    assert out.min() >= -1 and out.max() <= 1
    # A 32x48 frame cropped to a square keeps the central 32x32 columns 8..40.
    x = torch.arange(48.0).expand(1, 32, 48)
    cropped = video_io.resize_center_crop(x, 16, 16)
    assert cropped.shape == (1, 16, 16) and 8 <= cropped.min() and cropped.max() <= 40


@pytest.mark.parametrize("content", [b"this is not a video" * 50, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, b""])
def test_corrupt_or_empty_file(tmp_path, content):
    path = tmp_path / "broken_clip.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoReadError, match="broken_clip.mp4"):
        video_io.read_video(str(path), 9, 32, 32)


def test_missing_file(tmp_path):
    with pytest.raises(VideoReadError, match="missing_clip.mp4"):
        video_io.read_video(str(tmp_path / "missing_clip.mp4"), 9, 32, 32)


def test_file_over_max_bytes(tmp_path):
    uri = str(tmp_path / "big.mp4")
    video_io.write_video(uri, moving_gradient())
    with pytest.raises(VideoReadError, match="big.mp4"):
        video_io.read_video(uri, 9, 32, 32, max_bytes=100)


@pytest.mark.parametrize("limits, reason", [({"max_side": 16}, "frame size 32x32"), ({"max_frames": 4}, "9 frames")])
def test_limits_rejected_before_decoding(monkeypatch, limits, reason):
    data = video_io.encode_video(moving_gradient())

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded a clip that should have been rejected from its metadata")

    monkeypatch.setattr(video_io, "_decode_selected", must_not_decode)
    with pytest.raises(VideoReadError, match=f"huge.mp4.*{reason}"):
        video_io.decode_video(data, "huge.mp4", 9, 32, 32, **limits)


def test_frame_count_checked_when_metadata_lacks_it(monkeypatch):
    data = video_io.encode_video(moving_gradient())
    real_metadata = video_io._metadata
    monkeypatch.setattr(video_io, "_metadata", lambda c: {**real_metadata(c), "frames": 0})
    with pytest.raises(VideoReadError, match="exceed the limit of 4"):
        video_io.decode_video(data, "nometa.mp4", 9, 32, 32, max_frames=4)


def test_encode_rejects_odd_size():
    with pytest.raises(ValueError, match="even"):
        video_io.encode_video(torch.zeros(3, 2, 31, 32))
    with pytest.raises(ValueError, match="shape"):
        video_io.encode_video(torch.zeros(2, 32, 32))


def test_decode_image_png_and_video(tmp_path):
    rgb = (torch.rand(40, 60, 3) * 255).to(torch.uint8).numpy()
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    image = video_io.decode_image(png.getvalue(), "img.png", 20, 20)
    assert image.shape == (3, 20, 20) and image.min() >= -1 and image.max() <= 1

    video = moving_gradient()
    path = tmp_path / "first.mp4"
    video_io.write_video(str(path), video)
    first = video_io.read_image(str(path), 32, 32)
    assert (first - video[:, 0]).abs().mean() < 0.05

    with pytest.raises(VideoReadError, match="junk.png"):
        video_io.decode_image(b"junk" * 10, "junk.png", 20, 20)
    with pytest.raises(VideoReadError, match="huge.png.*60x40"):
        video_io.decode_image(png.getvalue(), "huge.png", 20, 20, max_side=30)
