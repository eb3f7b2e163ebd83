"""Ray Data preprocessing for training: every clip is decoded and encoded once with the frozen VAE and text encoder.

read training manifest -> decode clips (CPU tasks, PyAV) -> encoder actor pool (the frozen backbone resident:
VAE latent mean, prompt embedding, first-frame latents for I2V) which writes one safetensors shard per batch ->
index.parquet + errors.parquet + empty_prompt.safetensors -> prepared.json (last: marks the set complete).

The output lives in `<output>/<key>` where key = hash(manifest content, backbone URI, clip size), so a second run
with the same inputs finds `prepared.json` and returns at once; a changed manifest gets a new directory.
Bad clips are recorded with their reason in errors.parquet and skipped; they never fail the job.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from pipelines.common import ManifestError, error_text, frames_to_uint8, uint8_to_frames
from video2lora import storage
from video2lora.training import (
    EMPTY_PROMPT_NAME, ERRORS_NAME, INDEX_NAME, PREPARED_FORMAT, PREPARED_NAME, SHARDS_DIR, prepared_key, tensor_key,
)

logger = logging.getLogger(__name__)

REQUIRED = ("clip_id", "video_uri", "prompt", "effect")
OPTIONAL = ("image_uri", "split")


@dataclass
class PrepareResult:
    uri: str  # the prepared directory (pass to training as --prepared)
    skipped: bool  # True: an identical preparation existed and was reused
    num_clips: int
    num_ok: int
    num_failed: int
    seconds: float


# --------------------------------------------------------------------------------------------- manifest
def manifest_bytes(uri: str) -> bytes:
    """The manifest's content for hashing: the file, or every parquet file of a directory in name order."""
    fs, path = storage.fs_and_path(uri)
    if storage.retry(lambda: fs.isdir(path)):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        if not files:
            raise ManifestError(f"no parquet files under {storage.redact(uri)}")
        return b"".join(storage.retry(lambda f=f: fs.cat_file(f)) for f in files)
    return storage.read_bytes(uri)


def _resolve(base: str, uri: str | None) -> str | None:
    """Relative URIs in a manifest are relative to the manifest's directory."""
    if not uri:
        return None
    if "://" in uri or uri.startswith("/"):
        return uri
    if "://" in base:
        return posixpath.join(base.rsplit("/", 1)[0], uri)
    import os

    return os.path.join(os.path.dirname(os.path.abspath(base)), uri)


def read_training_manifest(uri: str, data: bytes | None = None) -> list[dict]:
    """Rows of a training manifest (clip_id, video_uri, prompt, effect, optional image_uri, split). Checked."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    try:
        fs, path = storage.fs_and_path(uri)
        if data is not None and not fs.isdir(path):
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    except Exception as e:
        raise ManifestError(f"cannot read training manifest {storage.redact(uri)}: {storage.redact(str(e))}") from None
    missing = [c for c in REQUIRED if c not in table.schema.names]
    if missing:
        raise ManifestError(f"training manifest lacks column(s) {missing}; it has {table.schema.names}")
    rows = []
    for r in table.to_pylist():
        row = {c: r.get(c) for c in REQUIRED + OPTIONAL}
        for c in REQUIRED:
            if row[c] is None or (c != "prompt" and str(row[c]) == ""):
                raise ManifestError(f"training manifest row {r.get('clip_id')!r}: {c} is empty")
        row["clip_id"], row["effect"], row["prompt"] = str(row["clip_id"]), str(row["effect"]), str(row["prompt"])
        row["video_uri"] = _resolve(uri, row["video_uri"])
        row["image_uri"] = _resolve(uri, row["image_uri"])
        row["split"] = str(row["split"]) if row["split"] else "train"
        rows.append(row)
    ids = pd.Series([r["clip_id"] for r in rows])
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise ManifestError(f"duplicate clip_id values in the training manifest: {dup[:10]}")
    if not rows:
        raise ManifestError(f"training manifest {storage.redact(uri)} has no rows")
    return rows


def default_clip_size(backbone_uri: str) -> tuple[int, int, int]:
    """(num_frames, height, width) the backbone was trained at: generation_defaults.json, else the transformer's
    sample size times the VAE's spatial factor, else the paper's 49 x 480 x 720."""
    from video2lora.config import GenerationConfig

    try:
        d = json.loads(storage.read_bytes(storage.join(backbone_uri, "generation_defaults.json")))
        return int(d["num_frames"]), int(d["height"]), int(d["width"])
    except (storage.StorageError, KeyError, ValueError):
        pass
    try:
        t = json.loads(storage.read_bytes(storage.join(backbone_uri, "transformer", "config.json")))
        v = json.loads(storage.read_bytes(storage.join(backbone_uri, "vae", "config.json")))
        scale = 2 ** (len(v["block_out_channels"]) - 1)
        return int(t["sample_frames"]), int(t["sample_height"]) * scale, int(t["sample_width"]) * scale
    except (storage.StorageError, KeyError, ValueError, TypeError):
        g = GenerationConfig()
        return g.num_frames, g.height, g.width


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory); URLs unchanged."""
    import os

    return uri if not uri or "://" in uri else os.path.abspath(uri)


# --------------------------------------------------------------------------------------------- stages
def decode_clips(batch: pd.DataFrame, num_frames: int, height: int, width: int) -> pd.DataFrame:
    """CPU stage: clip -> uint8 pixels (3, F, H, W) and first frame (3, H, W). A bad clip gets `error`, never raises."""
    from video2lora.video_io import read_image, read_video

    out = []
    for row in batch.to_dict("records"):
        rec = {k: row[k] for k in ("clip_id", "effect", "prompt", "split", "video_uri")}
        rec.update(pixels=b"", image=b"", error="")
        try:
            video = read_video(row["video_uri"], num_frames, height, width)
            image = read_image(row["image_uri"], height, width) if row.get("image_uri") else video[:, 0]
            rec["pixels"], rec["image"] = frames_to_uint8(video).tobytes(), frames_to_uint8(image).tobytes()
        except Exception as e:  # recorded per clip
            rec["error"] = error_text(e)
        out.append(rec)
    return pd.DataFrame(out)


class EncodeClips:
    """Actor: the frozen backbone stays resident; each batch of clips becomes one safetensors shard."""

    def __init__(self, backbone_uri: str, out_uri: str, num_frames: int, height: int, width: int,
                 encode_batch_size: int = 2, device: str | None = None):
        from video2lora.backbones import Backbone

        self.backbone = Backbone.from_pretrained(backbone_uri, device=device)
        self.out, self.size = out_uri, (num_frames, height, width)
        self.encode_batch_size = max(1, encode_batch_size)
        self.wrote_empty = False

    def _write_empty_prompt(self) -> None:
        from safetensors.torch import save

        empty = self.backbone.encode_prompts([""])[0].float().cpu().contiguous()
        storage.write_bytes_atomic(storage.join(self.out, EMPTY_PROMPT_NAME), save({"prompt_embeds": empty}))
        self.wrote_empty = True

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from safetensors.torch import save

        if not self.wrote_empty:
            self._write_empty_prompt()
        f, h, w = self.size
        rows = batch.to_dict("records")
        tensors, index = {}, []
        good = [r for r in rows if not r["error"]]
        for i in range(0, len(good), self.encode_batch_size):
            chunk = good[i : i + self.encode_batch_size]
            try:
                enc = self._encode(chunk, f, h, w)
            except Exception as e:  # the chunk fails together only if one clip breaks the batch: retry one by one
                enc = []
                for r in chunk:
                    try:
                        enc += self._encode([r], f, h, w)
                    except Exception as e1:
                        r["error"] = error_text(e1)
                        enc.append(None)
                logger.warning("encoding a chunk failed (%s); encoded its clips one by one", error_text(e))
            for r, e in zip(chunk, enc):
                if e is not None:
                    for name, t in e.items():
                        tensors[tensor_key(r["clip_id"], name)] = t
        ok = [r for r in rows if not r["error"]]
        shard = ""
        if ok:
            shard = storage.content_hash("\n".join(r["clip_id"] for r in ok).encode())[:20] + ".safetensors"
            storage.write_bytes_atomic(storage.join(self.out, SHARDS_DIR, shard), save(tensors, metadata={"format": "video2lora-prepared"}))
        for r in rows:
            index.append({"clip_id": r["clip_id"], "effect": r["effect"], "prompt": r["prompt"], "split": r["split"],
                          "video_uri": r["video_uri"], "shard": "" if r["error"] else shard, "error": r["error"]})
        return pd.DataFrame(index)

    @torch.no_grad()
    def _encode(self, rows: list[dict], f: int, h: int, w: int) -> list[dict[str, torch.Tensor]]:
        bb = self.backbone
        pixels = torch.stack([uint8_to_frames(r["pixels"], (3, f, h, w)) for r in rows])
        latents = bb.encode_video(pixels, generator=None)  # the mean: deterministic
        embeds = bb.encode_prompts([r["prompt"] for r in rows])
        out = [{"latents": latents[i].float().cpu().contiguous(), "prompt_embeds": embeds[i].float().cpu().contiguous()}
               for i in range(len(rows))]
        if bb.is_i2v:
            images = torch.stack([uint8_to_frames(r["image"], (3, h, w)) for r in rows])
            image_latents = bb.encode_first_frames(images, latents.shape[2])
            for i, o in enumerate(out):
                o["image_latents"] = image_latents[i].float().cpu().contiguous()
        return out


# --------------------------------------------------------------------------------------------- the job
def prepare(
    manifest_uri: str,
    backbone_uri: str,
    output_root: str,
    *,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    shard_size: int = 32,
    encode_batch_size: int = 2,
    num_encoders: int = 1,
    encoder_num_gpus: float = 0.0,
    encoder_num_cpus: float = 0.5,
    decode_num_cpus: float = 0.25,
    force: bool = False,
) -> PrepareResult:
    """Decode + encode every clip of the manifest once; reuse an identical earlier preparation."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    start = time.perf_counter()
    output_root = absolute(output_root)  # actors write there: never relative to their working directory
    data = manifest_bytes(manifest_uri)
    rows = read_training_manifest(manifest_uri, data)
    d_frames, d_height, d_width = default_clip_size(backbone_uri)
    num_frames, height, width = num_frames or d_frames, height or d_height, width or d_width
    key = prepared_key(data, backbone_uri, num_frames, height, width)
    out = storage.join(output_root, key)
    info_uri = storage.join(out, PREPARED_NAME)
    if storage.exists(info_uri) and not force:
        info = json.loads(storage.read_bytes(info_uri))
        logger.info("reusing the preparation in %s (%d clips encoded)", storage.redact(out), info["num_ok"])
        return PrepareResult(out, True, info["num_clips"], info["num_ok"], info["num_failed"], time.perf_counter() - start)

    logger.info("preparing %d clips of %s at %dx%dx%d into %s", len(rows), storage.redact(manifest_uri),
                num_frames, height, width, storage.redact(out))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 4, 200)))
    ds = ds.map_batches(decode_clips, fn_kwargs=dict(num_frames=num_frames, height=height, width=width),
                        batch_size=4, batch_format="pandas", num_cpus=decode_num_cpus)
    ds = ds.map_batches(
        EncodeClips,
        fn_constructor_kwargs=dict(backbone_uri=backbone_uri, out_uri=out, num_frames=num_frames, height=height,
                                   width=width, encode_batch_size=encode_batch_size),
        batch_size=shard_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=num_encoders),
        num_gpus=encoder_num_gpus, num_cpus=encoder_num_cpus,
    )
    results = pd.DataFrame(ds.take_all()) if len(rows) else pd.DataFrame()
    ok = results[results["error"] == ""].sort_values("clip_id")
    bad = results[results["error"] != ""].sort_values("clip_id")
    if len(ok) == 0:
        raise RuntimeError(f"no clip of {storage.redact(manifest_uri)} could be prepared; first errors: "
                           f"{bad['error'].head(3).tolist()}")
    for name, frame, cols in ((INDEX_NAME, ok, ["clip_id", "effect", "prompt", "split", "shard"]),
                              (ERRORS_NAME, bad, ["clip_id", "video_uri", "error"])):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame[cols].reset_index(drop=True), preserve_index=False), buf)
        storage.write_bytes_atomic(storage.join(out, name), buf.getvalue())
    model_index = json.loads(storage.read_bytes(storage.join(backbone_uri, "model_index.json")))
    info = {
        "format": PREPARED_FORMAT,
        "manifest": storage.redact(manifest_uri),
        "manifest_sha256": storage.content_hash(data),
        "backbone": storage.redact(backbone_uri),
        "pipeline": model_index.get("_class_name", ""),
        "i2v": "ImageToVideo" in model_index.get("_class_name", ""),
        "num_frames": num_frames, "height": height, "width": width,
        "num_clips": len(rows), "num_ok": int(len(ok)), "num_failed": int(len(bad)),
        "num_shards": int(ok["shard"].nunique()),
        "effects": sorted(ok["effect"].unique().tolist()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    storage.write_bytes_atomic(info_uri, json.dumps(info, indent=2).encode())
    if len(bad):
        logger.warning("%d of %d clips could not be prepared (see %s), e.g. %s", len(bad), len(rows),
                       storage.redact(storage.join(out, ERRORS_NAME)), bad["error"].iloc[0])
    logger.info("prepared %d clips in %d shards in %.1fs", len(ok), info["num_shards"], info["seconds"])
    return PrepareResult(out, False, len(rows), int(len(ok)), int(len(bad)), time.perf_counter() - start)


def resolve_prepared(prepared: str, manifest: str, backbone: str, **kwargs) -> PrepareResult:
    """`prepared` is either a complete preparation (has prepared.json) or a root to prepare into (or reuse)."""
    prepared = absolute(prepared)
    info_uri = storage.join(prepared, PREPARED_NAME)
    if storage.exists(info_uri):
        info = json.loads(storage.read_bytes(info_uri))
        return PrepareResult(prepared, True, info["num_clips"], info["num_ok"], info["num_failed"], 0.0)
    return prepare(manifest, backbone, prepared, **kwargs)


def result_dict(r: PrepareResult) -> dict:
    return asdict(r)
