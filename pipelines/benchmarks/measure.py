"""How the benchmark items measure: side-by-side timing, peak memory, what a batch run's outputs say about its
timeline, the machine, and the report's markdown table and JSON. Nothing here asserts a number: benchmarks are
not tests.

Timing on a shared machine: every comparison runs its candidates interleaved (A B C, B C A, C A B, ...) and
repeated, and reports medians and the median of per-round ratios, so load from other processes hits every
candidate alike.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
import time
from collections import Counter
from typing import Callable

import torch


# --------------------------------------------------------------------------------------------- timing
def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each call, candidates interleaved and rotated every round (after `warmup` untimed rounds).
    If `cpu` is given it receives the CPU seconds of this process per call as well: with one torch thread that is
    the call's own compute, much less sensitive than wall time to other processes on a shared machine."""
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            candidates[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu[n].append(time.process_time() - start_cpu)
    return times


def median(xs) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return statistics.median(xs) if xs else float("nan")


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios num[i] / den[i] (rounds ran side by side, so each ratio saw the same load)."""
    return median([a / b for a, b in zip(num, den) if b > 0])


def spread(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": median(xs), "min": min(xs) if xs else float("nan"), "max": max(xs) if xs else float("nan"),
            "n": len(xs)}


# --------------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


def lora_state_bytes(module: torch.nn.Module) -> int:
    """Bytes the per-sample LoRAs hold in a LightLoRA-injected model: materialised factors, strengths, caches."""
    from video2lora.lightlora import LightLoRALinear

    tensors = []
    for m in module.modules():
        if isinstance(m, LightLoRALinear) and m.lora is not None:
            tensors += [m.lora.down, m.lora.up, m.row_scale, m.row_index]
            if m._rows is not None:
                tensors += [m._rows[4], m._rows[5]]
    return tensor_bytes(tensors)


def peak_step_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during fn(), above what was allocated before it (CUDA: the caching allocator's
    peak; CPU: the profiler's allocation records, summed in time order)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set (VmHWM) of a process on this machine (default: this one); 0 where unknown."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ProcessPeakMemory:
    """Polls the peak RSS of this node's Ray worker processes whose title contains `marker` (e.g. RayTrainWorker)
    while a job runs. Only processes under this driver's raylet are seen: on a multi-node cluster, only the
    workers on the driver's node."""

    def __init__(self, marker: str, interval_s: float = 0.5):
        self.marker, self.interval = marker, interval_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _raylet(self):
        import psutil
        import ray

        try:
            node = ray._private.worker._global_node
            return psutil.Process(node.all_processes["raylet"][0].process.pid) if node else None
        except Exception:  # noqa: BLE001 - connected to a remote cluster: no raylet here
            return None

    def _run(self):
        import psutil

        raylet = self._raylet()
        while raylet is not None and not self._stop.is_set():
            try:
                for p in raylet.children(recursive=True):
                    try:
                        if self.marker in " ".join(p.cmdline()):
                            self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), peak_rss_bytes(p.pid))
                    except (psutil.Error, OSError):
                        continue
            except psutil.Error:
                break
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------- a batch run's outputs
def row_finish_times(output: str, since: float) -> list[float]:
    """Seconds after `since` (time.time()) at which each row's sidecar (written when the row was done) appeared."""
    d = os.path.join(output, "rows")
    if not os.path.isdir(d):
        return []
    return sorted(os.stat(os.path.join(d, f)).st_mtime - since for f in os.listdir(d) if f.endswith(".json"))


def steady_state(finish: list[float], batch_size: int) -> dict:
    """Throughput once the first batch is out: from the end of the first batch to the end of the last, so actor
    start-up, model loading and the first batch's latency are left out."""
    n = len(finish)
    if n <= batch_size:
        return {"first_row_out_s": finish[0] if finish else float("nan"), "steady_s_per_row": float("nan")}
    first_batch_done = finish[batch_size - 1]
    return {"first_row_out_s": finish[0], "first_batch_out_s": first_batch_done, "last_row_out_s": finish[-1],
            "steady_s_per_row": (finish[-1] - first_batch_done) / (n - batch_size)}


def generation_batches(results) -> list[int]:
    """Sizes of the batches the generation stage ran: rows of one call share their worker and per-row time."""
    ok = results[results.status == "ok"]
    return sorted(Counter(zip(ok.gen_worker, ok.t_generate_s)).values(), reverse=True)


# --------------------------------------------------------------------------------------------- the machine and the report
def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for mod in ("diffusers", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not math.isfinite(value):
        return "n/a"
    if unit == "%":
        return f"{100 * value:+.1f} %"
    if unit == "x":
        return f"{value:.2f}x" if abs(value) >= 0.1 else f"{value:.2g}x"
    if unit == "%hit":
        return f"{100 * value:.0f} %"
    if abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| # | Measurement | Value | Target | Met? |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**MISSED**", None: "—"}[r.get("met")]
        value = fmt(r["value"], r.get("unit", ""))
        if r.get("alt_label"):
            value += f" ({r['alt_label']}: {fmt(r.get('alt_value'), r.get('unit', ''))})"
        lines.append(f"| {r['item']} | {r['name']} | {value} | {r.get('target') or '—'} | {met} |")
    return "\n".join(lines)


def dumps(obj) -> str:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, torch.Tensor):
            return clean(o.tolist())
        return o

    return json.dumps(clean(obj), indent=2)
