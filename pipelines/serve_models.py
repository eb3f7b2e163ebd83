"""The online app's model deployments (pipelines/serve.py is the app): the LoRA predictor (VAE encoder +
hypernetwork) and the generator (text encoder + DiT + VAE), each over the batch job's stage of the same models."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from pipelines.common import error_text
from pipelines.config import ServeConfig
from video2lora.config import InputError


@serve.deployment
class LoRAPredictor:
    """VAE encoder + hypernetwork (pipelines.stages.HypernetStage): references in, LoRAs out, each distinct
    reference (by content hash) decoded and predicted once per replica."""

    def __init__(self, cfg: ServeConfig):
        from pipelines.stages import HypernetStage

        self.cfg = cfg
        self.stage = HypernetStage(cfg.backbone, cfg.checkpoint, cfg.job_config())
        self.predict.set_max_batch_size(cfg.batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def held_modules(self) -> list[str]:
        """Names of the models this replica keeps resident (tests/test_serve.py checks them)."""
        return list(self.stage.predictor.modules())

    @serve.batch
    async def predict(self, items: list[tuple[str, bytes]]) -> list[dict]:
        """(reference hash, reference file bytes) per request -> {"lora_a", "lora_b", "cache_hit", "t_s"} or
        {"error", "field"}."""
        return await asyncio.to_thread(self._predict, items)

    def _predict(self, items):
        import pandas as pd

        from pipelines.stages import reference_pixels

        start = time.perf_counter()
        job = self.stage.cfg  # the batch job settings the stage was built with
        rows, decoded = [], {}
        for h, data in items:  # decode each distinct uncached reference once, as fetch_and_decode does
            row = {"sample_id": h, "status": "pending", "error": "", "reference_hash": h, "ref_hashes": [h],
                   "ref_weights": [1.0], "ref_pixels": [b""]}
            if h not in self.stage.cache:
                try:
                    if h not in decoded:
                        decoded[h] = reference_pixels(data, "reference", job)
                    row["ref_pixels"] = [decoded[h]]
                except Exception as e:  # noqa: BLE001 - this request's reference only
                    row.update(status="failed", error=error_text(e))
            rows.append(row)
        out = self.stage(pd.DataFrame(rows)).to_dict("records")
        elapsed = (time.perf_counter() - start) / len(items)
        return [{"error": r["error"], "field": "reference"} if r["status"] != "pending" else
                {"lora_a": r["lora_a"], "lora_b": r["lora_b"], "cache_hit": bool(r["lora_cache_hit"]), "t_s": elapsed}
                for r in out]

    def ping(self) -> str:
        return "ok"


@serve.deployment
class Generator:
    """Text encoder + DiT + VAE (pipelines.stages.GenerateStage): concurrent requests denoised in one batch, each
    with its own LoRA; rows with different sizes or steps in one batch are generated group by group."""

    def __init__(self, cfg: ServeConfig):
        from pipelines.stages import GenerateStage

        self.cfg = cfg
        self.stage = GenerateStage(cfg.backbone, cfg.checkpoint, cfg.job_config())
        self.generate.set_max_batch_size(cfg.batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def held_modules(self) -> list[str]:
        return sorted(self.stage.generator.modules())

    @serve.batch
    async def generate(self, items: list[dict]) -> list[dict]:
        """Checked requests with their LoRAs (the batch job's row form) -> {"video", "video_shape", "batch_size",
        "t_s"} or {"error", "field"} each."""
        return await asyncio.to_thread(self._generate, items)

    def _generate(self, items):
        import pandas as pd

        from pipelines.stages import GROUP_KEY

        out, rows = [None] * len(items), []
        for i, it in enumerate(items):
            it = dict(it)
            try:
                self.stage.generator.check_request(it["num_frames"], it["height"], it["width"], bool(it["image_pixels"]))
            except InputError as e:
                out[i] = {"error": str(e), "field": "image" if e.field == "image_uri" else e.field, "status": 422}
                continue
            if it["lora_file"]:
                try:
                    self.stage.generator.lora_from_file(it["lora_file"], "lora")
                except Exception as e:  # noqa: BLE001 - keys or shapes that do not fit this backbone
                    out[i] = {"error": error_text(e), "field": "lora", "status": 422}
                    continue
                it.update(lora_a=b"", lora_b=b"")
            else:
                it["lora_a"], it["lora_b"] = self._blend(it.pop("loras"), it.pop("weights")).to_bytes()
            it.pop("loras", None), it.pop("weights", None)
            rows.append((i, {**it, "sample_id": str(i), "status": "pending", "error": ""}))
        sizes: dict[tuple, int] = {}
        for _, r in rows:
            key = tuple(r[k] for k in GROUP_KEY)
            sizes[key] = sizes.get(key, 0) + 1
        if rows:
            start = time.perf_counter()
            made = self.stage(pd.DataFrame([r for _, r in rows])).to_dict("records")
            elapsed = time.perf_counter() - start
            for (i, r), m in zip(rows, made):
                out[i] = ({"error": m["error"], "field": "", "status": 500} if m["status"] != "pending" else
                          {"video": m["video"], "video_shape": m["video_shape"], "t_s": elapsed,
                           "batch_size": sizes[tuple(r[k] for k in GROUP_KEY)], "worker": m["gen_worker"]})
        return out

    def _blend(self, loras: list[tuple[bytes, bytes]], weights: list[float]):
        from video2lora.predict import PredictedLoRA

        gen = self.stage.generator
        return PredictedLoRA.blend([gen.lora_from_bytes(a, b) for a, b in loras], weights)

    def export_lora(self, loras: list[tuple[bytes, bytes]], weights: list[float], strength: float) -> bytes:
        """A request's LoRA (its references' mix) as a diffusers/PEFT safetensors file (this replica holds the aux
        matrices)."""
        return self.stage.generator.export_lora(self._blend(loras, weights), strength)

    def ping(self) -> str:
        return "ok"
