"""What every Ray stage and job shares: starting Ray, the per-row error text, frame packing, input errors."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from video2lora.storage import redact

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout: local workers import from it


class ManifestError(ValueError):
    """A manifest as a whole is unusable (unreadable, a missing column, duplicate ids); raised before any work."""


class SetupError(ValueError):
    """The checkpoint or the backbone cannot be used; raised on the driver before any Ray work starts."""


def error_text(e: BaseException) -> str:
    """A row's failure reason: type and message, secrets redacted, bounded."""
    return redact(f"{type(e).__name__}: {e}")[:2000]


def frames_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1] -> uint8, the compact form frames travel in between stages."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def uint8_to_frames(buf: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).reshape(shape).astype(np.float32)) / 127.5 - 1


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True,
             include_dashboard: bool | None = None, env_vars: dict | None = None, system_config: dict | None = None,
             attempts: int = 1) -> None:
    """Join the job's cluster (`ray job submit` sets RAY_ADDRESS; or --ray-address), else start a fresh local
    instance: never whatever cluster address a `ray start` once left in /tmp/ray (a stale one makes a bare
    ray.init wait for a GCS that is gone). A local run ships this checkout on the workers' PYTHONPATH, so they
    import `pipelines` wherever the job was started from. Does nothing if Ray is already initialised."""
    import ray

    if ray.is_initialized():  # the caller already chose (a test, a notebook)
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"log_to_driver": log_to_driver}
    if address in ("local", "auto"):
        path = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH", "")) if x)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path, **(env_vars or {})}}
    if address == "local":
        kwargs.update(num_cpus=num_cpus, include_dashboard=include_dashboard)
        if system_config:
            kwargs["_system_config"] = system_config
    for attempt in range(attempts):  # a heavily loaded machine can miss Ray's fixed 30 s node start-up deadline
        try:
            ray.init(address=address, **kwargs)
            break
        except Exception:  # noqa: BLE001
            if attempt == attempts - 1:
                raise
            logger.warning("Ray did not start (attempt %d of %d), retrying", attempt + 1, attempts, exc_info=True)
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False


# Ray's core worker prints this at error level for every Ray Data actor pool: Ray Data itself ray.put()s each
# pool's map function and keeps the reference for as long as the pool lives (ray-project/ray#53727), so the restart
# it warns about cannot fail here. It is the one line of a clean run that looks like a fault.
_KNOWN_RAY_NOTICES = re.compile(rb"\[[^\]\n]*\] core_worker\.cc:\d+: Actor with class name: '[^'\n]*MapBatches\([^\n]*"
                                rb"has constructor arguments in the object store and max_restarts > 0\.[^\n]*\n")


def hide_known_ray_notices() -> None:
    """Filter the process's stderr (file descriptor 2, where Ray's C++ core worker writes) of _KNOWN_RAY_NOTICES;
    everything else passes through at once, progress bars included."""
    import atexit
    import sys
    import threading

    if os.environ.get("VIDEO2LORA_RAW_STDERR") or not hasattr(os, "pipe"):
        return
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    done = threading.Event()
    end = b"\0video2lora-stderr-filter-end\0"

    def forward():
        while True:
            chunk = os.read(read_end, 65536)
            last = not chunk or end in chunk
            chunk = _KNOWN_RAY_NOTICES.sub(b"", chunk.split(end)[0])
            if chunk:
                os.write(original, chunk)
            if last:
                done.set()
                return

    def restore():  # at exit: pass on what is still in the pipe, then give the process its stderr back
        sys.stderr.flush()
        os.write(2, end)
        done.wait(5)
        os.dup2(original, 2)

    threading.Thread(target=forward, name="stderr-filter", daemon=True).start()
    atexit.register(restore)
