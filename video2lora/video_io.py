"""Video/image decode, resample and encode with PyAV.

Tensors are float32 ``(C, F, H, W)`` (images ``(C, H, W)``) with pixels in ``[-1, 1]``.
Readers check stream metadata against size limits before decoding anything, and keep only the frames they
return, so a long or huge upload cannot exhaust memory.
"""

import io
import logging
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from . import storage

logger = logging.getLogger(__name__)

MAX_SIDE = 4096
MAX_FRAMES = 10_000
MAX_BYTES = 1 << 30


class VideoReadError(ValueError):
    """A video/image could not be read; the message names the (redacted) file and the reason."""


def _error(uri: str, reason: str) -> VideoReadError:
    return VideoReadError(f"cannot read {storage.redact(uri)}: {storage.redact(reason)}")


def _av_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def _open(data: bytes, uri: str):
    if not data:
        raise _error(uri, "empty file")
    try:
        # Only the bytes given are read: an empty protocol whitelist ("none" names no protocol) stops demuxers
        # that open other files or URLs (e.g. an ffconcat script named .mp4 pointing at files on the worker).
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="replace",
                            container_options={"protocol_whitelist": "none"})
    except (av.FFmpegError, EOFError) as err:
        raise _error(uri, f"not a readable video ({_av_reason(err)})") from None
    if not container.streams.video or container.streams.video[0].codec_context is None:
        container.close()
        raise _error(uri, "no decodable video stream")
    return container


def _metadata(container) -> dict:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    frames = stream.frames
    if not frames and container.duration and fps:  # e.g. webm/mkv: estimate from the duration
        frames = round(container.duration / av.time_base * fps)
    return dict(width=stream.codec_context.width, height=stream.codec_context.height, frames=frames, fps=fps)


def _check_size(uri: str, width: int, height: int, max_side: int) -> None:
    if width <= 0 or height <= 0:
        raise _error(uri, f"invalid frame size {width}x{height}")
    if width * height > max_side**2:
        raise _error(uri, f"frame size {width}x{height} exceeds the limit of {max_side}x{max_side} pixels")


def _check_frames(uri: str, frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise _error(uri, f"{frames} frames exceed the limit of {max_frames}")


def probe_video(data: bytes, uri: str) -> dict:
    """``dict(width, height, frames, fps)`` from the container metadata (``frames`` may be an estimate)."""
    with _open(data, uri) as container:
        return _metadata(container)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``total`` frames (repeating frames if the clip is short)."""
    return torch.linspace(0, total - 1, num_frames).round().long().tolist()


def resize_center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center-crop ``(..., H, W)`` to the target aspect ratio, then resize (bilinear, antialiased)."""
    h, w = pixels.shape[-2:]
    scale = max(height / h, width / w)
    crop_h, crop_w = min(h, round(height / scale)), min(w, round(width / scale))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    pixels = pixels[..., top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return pixels
    lead = pixels.shape[:-3]
    pixels = F.interpolate(
        pixels.reshape(-1, *pixels.shape[-3:]), size=(height, width), mode="bilinear", antialias=True
    )
    return pixels.reshape(*lead, *pixels.shape[-3:])


def _to_tensor(rgb, height: int, width: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, height, width)`` float32 in ``[-1, 1]``."""
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).float()
    pixels = resize_center_crop(pixels, height, width)
    return (pixels / 127.5 - 1.0).clamp_(-1.0, 1.0)


def _count_frames(container, uri: str, max_frames: int) -> int:
    """Exact frame count by demuxing (no decoding); stops as soon as ``max_frames`` is exceeded."""
    count = 0
    for packet in container.demux(container.streams.video[0]):
        if packet.size:  # the final flush packet is empty
            count += 1
            _check_frames(uri, count, max_frames)
    return count


def _decode_selected(container, uri: str, indices: list[int], height: int, width: int, max_side: int):
    """Decode frames in order, keeping (resized) only those in ``indices``; ``{index: (3, H, W)}``."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    wanted, kept = set(indices), {}
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            _check_size(uri, frame.width, frame.height, max_side)
            kept[i] = _to_tensor(frame.to_ndarray(format="rgb24"), height, width)
        if i >= indices[-1]:
            break
    return kept


def decode_video(
    data: bytes,
    uri: str,
    num_frames: int,
    height: int,
    width: int,
    max_side: int = MAX_SIDE,
    max_frames: int = MAX_FRAMES,
) -> torch.Tensor:
    """Decode ``num_frames`` frames sampled uniformly over the clip -> ``(3, num_frames, height, width)``.

    Clips larger than ``max_side x max_side`` pixels or longer than ``max_frames`` frames are rejected from
    their metadata before any frame is decoded. ``uri`` only names the file in errors.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be >= 1, got {num_frames}, {height}, {width}")
    try:
        with _open(data, uri) as container:
            meta = _metadata(container)
            _check_size(uri, meta["width"], meta["height"], max_side)
            _check_frames(uri, meta["frames"], max_frames)
            total = _count_frames(container, uri, max_frames)
        if total == 0:
            raise _error(uri, "no frames")
        indices = sample_indices(total, num_frames)
        with _open(data, uri) as container:
            kept = _decode_selected(container, uri, indices, height, width, max_side)
    except av.FFmpegError as err:
        raise _error(uri, f"corrupt video ({_av_reason(err)})") from None
    if not kept:
        raise _error(uri, "no decodable frames")
    if len(kept) < len(set(indices)):  # fewer frames decoded than demuxed (e.g. corrupt tail): repeat the last
        logger.warning("%s: decoded fewer frames than expected", storage.redact(uri))
    frames, last = [], kept[min(kept)]
    for i in indices:
        last = kept.get(i, last)
        frames.append(last)
    return torch.stack(frames, dim=1)


def read_video(
    uri: str, num_frames: int, height: int, width: int, *, max_bytes: int | None = MAX_BYTES, **limits
) -> torch.Tensor:
    """:func:`storage.read_bytes` + :func:`decode_video`; every failure is a :class:`VideoReadError`."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except storage.StorageError as err:
        raise VideoReadError(str(err)) from None
    return decode_video(data, uri, num_frames, height, width, **limits)


def decode_image(data: bytes, uri: str, height: int, width: int, max_side: int = MAX_SIDE) -> torch.Tensor:
    """Decode an image (or the first frame of a video) -> ``(3, height, width)``."""
    if not data:
        raise _error(uri, "empty file")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: only the header is parsed here
    except UnidentifiedImageError:
        return decode_video(data, uri, 1, height, width, max_side=max_side)[:, 0]
    except (OSError, Image.DecompressionBombError) as err:
        raise _error(uri, f"corrupt image ({err})") from None
    with image:
        _check_size(uri, image.width, image.height, max_side)
        try:
            rgb = np.array(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, ValueError) as err:
            raise _error(uri, f"corrupt image ({err})") from None
    return _to_tensor(rgb, height, width)


def read_image(uri: str, height: int, width: int, *, max_bytes: int | None = MAX_BYTES, **limits) -> torch.Tensor:
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except storage.StorageError as err:
        raise VideoReadError(str(err)) from None
    return decode_image(data, uri, height, width, **limits)


def encode_video(frames: torch.Tensor, fps: float = 8, crf: int = 18) -> bytes:
    """``(3, F, H, W)`` in ``[-1, 1]`` -> mp4 (H.264, yuv420p) bytes. H and W must be even."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"expected frames of shape (3, F, H, W), got {tuple(frames.shape)}")
    _, _, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even height and width, got {height}x{width}")
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(1, 2, 3, 0).cpu().numpy()  # (F, H, W, 3)

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for rgb in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return buffer.getvalue()


def write_video(uri: str, frames: torch.Tensor, fps: float = 8) -> None:
    storage.write_bytes_atomic(uri, encode_video(frames, fps=fps))
