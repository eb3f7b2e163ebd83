"""The batch job's Ray metrics (`ray.util.metrics`), on the Ray dashboard and each node's Prometheus endpoint
(`ray_video2lora_*`): rows by status, per-stage seconds, LoRA cache hits, rows in flight. Recorded on the driver as
results come back (every row passes there once), tagged with the job's output so runs stay apart."""

from __future__ import annotations

STAGES = ("fetch", "hypernet", "generate", "write")
# seconds per row: a tiny model's rows take milliseconds, CogVideoX-5b's minutes
BOUNDARIES = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800]


class JobMetrics:
    def __init__(self, job: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"job": job}
        self.rows = Counter("video2lora_rows", description="batch rows finished, by status (ok, failed, skipped)",
                            tag_keys=("job", "status"))
        self.stage_seconds = Histogram("video2lora_stage_seconds", description="seconds per row in each stage",
                                       boundaries=BOUNDARIES, tag_keys=("job", "stage"))
        self.cache = Counter("video2lora_lora_cache", description="rows whose LoRA came from the reference cache "
                             "(hit) or was predicted (miss)", tag_keys=("job", "result"))
        self.in_flight = Gauge("video2lora_rows_in_flight", description="rows handed to Ray and not yet back",
                               tag_keys=("job",))

    def count(self, status: str, n: int = 1) -> None:
        if n:
            self.rows.inc(n, tags={**self.tags, "status": status})

    def finished(self, rec: dict) -> None:
        """One row back from the pipeline."""
        self.count(rec["status"])
        for stage in STAGES:
            seconds = rec.get(f"t_{stage}_s")
            if seconds is not None and seconds == seconds and seconds > 0:  # not None, not NaN
                self.stage_seconds.observe(float(seconds), tags={**self.tags, "stage": stage})
        if rec.get("reference_hash") and rec.get("lora_cache_hit") is not None and rec["status"] == "ok":
            self.cache.inc(1, tags={**self.tags, "result": "hit" if rec["lora_cache_hit"] else "miss"})

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(max(n, 0), tags=self.tags)
