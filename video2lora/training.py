"""Training pieces that know nothing about Ray or DeepSpeed.

* The prepared data format: what `pipelines/prepare.py` writes once per (manifest, backbone, clip size) and every
  training epoch reads -- VAE latents, prompt embeddings and first-frame latents as safetensors shards, an index,
  the empty prompt's embedding, and `prepared.json` (written last: its presence means the set is complete).
* Pairing as in the paper: each target clip is paired with another clip of the same effect as its reference,
  re-drawn every epoch from a seeded RNG, never the clip itself when its effect has other clips.
* A deterministic schedule: global step -> (epoch, offset) -> the global batch of pairs; rank r of W takes rows
  [r*B, (r+1)*B). A plain loop with batch W*B therefore sees exactly the samples of a W-worker run.
* The loss step: the hypernetwork predicts one LoRA per reference, the frozen backbone computes its scheduler's own
  training loss on the target with those LoRAs applied, with classifier-free dropout of the prompt.
* `train_single_process`: the plain single-process loop (the baseline and a test oracle), and the metrics table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from . import storage
from .config import TrainConfig
from .hypernet import load_safetensors_bytes
from .lightlora import inject_lightlora, per_sample_loras

logger = logging.getLogger(__name__)

PREPARED_FORMAT = 1
PREPARED_NAME = "prepared.json"
INDEX_NAME = "index.parquet"
ERRORS_NAME = "errors.parquet"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
SHARDS_DIR = "shards"
TENSOR_FIELDS = ("latents", "prompt_embeds", "image_latents")
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "data_wait_s", "time_s")


# --------------------------------------------------------------------------------------------- prepared data
def prepared_key(manifest_bytes: bytes, backbone_uri: str, num_frames: int, height: int, width: int) -> str:
    """Identity of a preparation: the manifest's content, the backbone and the clip size (and our format)."""
    h = storage.content_hash(manifest_bytes)
    ident = json.dumps([PREPARED_FORMAT, h, backbone_uri.rstrip("/"), num_frames, height, width])
    return storage.content_hash(ident.encode())[:16]


def tensor_key(clip_id: str, name: str) -> str:
    return f"{clip_id}/{name}"


_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool,
}


class ShardReader:
    """Reads single tensors out of safetensors shards with range requests (header once, then only the bytes of
    the tensors asked for), so a random pair costs two small reads, not two whole shards. Safetensors only."""

    def __init__(self, prepared_uri: str, max_headers: int = 1024):
        self.root = prepared_uri
        self.headers: OrderedDict[str, tuple[int, dict]] = OrderedDict()
        self.max_headers = max_headers

    def _header(self, shard: str) -> tuple[int, dict]:
        if shard in self.headers:
            self.headers.move_to_end(shard)
            return self.headers[shard]
        uri = storage.join(self.root, SHARDS_DIR, shard)
        fs, path = storage.fs_and_path(uri)
        head = storage.retry(lambda: fs.cat_file(path, start=0, end=8))
        if len(head) != 8:
            raise ValueError(f"{storage.redact(uri)}: not a safetensors shard")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{storage.redact(uri)}: not a safetensors shard (header of {n} bytes)")
        meta = json.loads(storage.retry(lambda: fs.cat_file(path, start=8, end=8 + n)))
        self.headers[shard] = (8 + n, meta)
        if len(self.headers) > self.max_headers:
            self.headers.popitem(last=False)
        return self.headers[shard]

    def read(self, shard: str, keys: list[str]) -> dict[str, torch.Tensor]:
        base, meta = self._header(shard)
        fs, path = storage.fs_and_path(storage.join(self.root, SHARDS_DIR, shard))
        out = {}
        for key in keys:
            if key not in meta:
                raise KeyError(f"{shard}: no tensor {key!r}")
            info = meta[key]
            dtype = _ST_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            data = storage.retry(lambda: fs.cat_file(path, start=base + start, end=base + end))
            t = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            out[key] = t.reshape(info["shape"])
        return out

    def example(self, shard: str, clip_id: str, fields: tuple[str, ...]) -> dict[str, torch.Tensor]:
        got = self.read(shard, [tensor_key(clip_id, f) for f in fields])
        return {f: got[tensor_key(clip_id, f)] for f in fields}


@dataclass
class PreparedData:
    """A complete preparation: `info` (prepared.json), `index` (one dict per encoded clip, sorted by clip_id)."""

    uri: str
    info: dict
    index: list[dict]
    empty_prompt: torch.Tensor
    _reader: ShardReader | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, uri: str, split: str | None = None) -> "PreparedData":
        import pyarrow.parquet as pq

        info_uri = storage.join(uri, PREPARED_NAME)
        if not storage.exists(info_uri):
            raise FileNotFoundError(f"{storage.redact(uri)} is not a complete preparation (no {PREPARED_NAME})")
        info = json.loads(storage.read_bytes(info_uri))
        if info.get("format") != PREPARED_FORMAT:
            raise ValueError(f"{storage.redact(uri)}: prepared format {info.get('format')}, expected {PREPARED_FORMAT}")
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, INDEX_NAME))))
        index = sorted(table.to_pylist(), key=lambda r: r["clip_id"])
        if split and split != "all":
            index = [r for r in index if (r.get("split") or "train") == split]
        empty = load_safetensors_bytes(storage.read_bytes(storage.join(uri, EMPTY_PROMPT_NAME)), EMPTY_PROMPT_NAME)
        return cls(uri=uri, info=info, index=index, empty_prompt=empty["prompt_embeds"])

    @property
    def fields(self) -> tuple[str, ...]:
        return ("latents", "prompt_embeds", "image_latents") if self.info.get("i2v") else ("latents", "prompt_embeds")

    @property
    def effects(self) -> list[str]:
        return [r["effect"] for r in self.index]

    def example(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of index row i (cached: the plain loop keeps a small prepared set in memory)."""
        if i not in self._cache:
            if self._reader is None:
                self._reader = ShardReader(self.uri)
            row = self.index[i]
            self._cache[i] = self._reader.example(row["shard"], row["clip_id"], self.fields)
        return self._cache[i]


# --------------------------------------------------------------------------------------------- pairing
def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def draw_pairs(effects: list[str], seed: int, epoch: int) -> list[tuple[int, int]]:
    """(target, reference) index pairs for one epoch, in training order: every clip is a target once, its
    reference is another clip of the same effect drawn uniformly (the clip itself only if it is alone)."""
    rng = _rng(seed, epoch, 0x9A1E)
    members: dict[str, list[int]] = {}
    slot: dict[int, int] = {}
    for i, e in enumerate(effects):
        slot[i] = len(members.setdefault(e, []))
        members[e].append(i)
    pairs = []
    for t in rng.permutation(len(effects)).tolist():
        group = members[effects[t]]
        if len(group) == 1:
            pairs.append((t, t))
            continue
        j = int(rng.integers(len(group) - 1))  # uniform over the other clips of the effect
        pairs.append((t, group[j + (j >= slot[t])]))
    return pairs


def steps_per_epoch(num_clips: int, global_batch: int) -> int:
    return num_clips // global_batch


def position_of_step(num_clips: int, global_batch: int, step: int) -> tuple[int, int]:
    """(epoch, offset) of the first sample of 1-based `step` (the last partial batch of an epoch is dropped)."""
    spe = steps_per_epoch(num_clips, global_batch)
    if spe == 0:
        raise ValueError(
            f"{num_clips} training clips are fewer than one global batch of {global_batch} "
            "(num_workers x batch_size): add clips or lower the batch size"
        )
    return (step - 1) // spe, ((step - 1) % spe) * global_batch


def schedule(effects: list[str], seed: int, global_batch: int, start_step: int, end_step: int):
    """Yield (step, epoch, offset, global batch of pairs) for steps start_step+1 .. end_step."""
    cached_epoch, pairs = None, None
    for step in range(start_step + 1, end_step + 1):
        epoch, offset = position_of_step(len(effects), global_batch, step)
        if epoch != cached_epoch:
            cached_epoch, pairs = epoch, draw_pairs(effects, seed, epoch)
        yield step, epoch, offset, pairs[offset : offset + global_batch]


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the per-step generator (noise, timesteps, prompt dropout): a function of (seed, step, rank), so a
    resumed run draws exactly what an uninterrupted one draws without replaying any RNG stream."""
    digest = storage.content_hash(struct.pack("<qqq", int(seed), int(step), int(rank)).hex().encode())
    return int(digest[:15], 16)


# --------------------------------------------------------------------------------------------- the loss step
def stack_examples(examples: list[dict[str, torch.Tensor]]) -> dict:
    """Prepared examples -> one batch dict (latents, prompt_embeds, image_latents for I2V)."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def collate(examples: list[dict[str, torch.Tensor]], references: list[dict[str, torch.Tensor]]) -> dict:
    batch = stack_examples(examples)
    batch["ref_latents"] = torch.stack([r["latents"] for r in references])
    return batch


def prompt_dropout(prompt_embeds: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator):
    """Replace each row's prompt embedding by the empty prompt's with probability p (classifier-free dropout)."""
    drop = torch.rand(prompt_embeds.shape[0], generator=generator) < p
    if p <= 0 or not bool(drop.any()):
        return prompt_embeds, drop
    empty = empty.to(prompt_embeds.device, prompt_embeds.dtype).expand_as(prompt_embeds)
    return torch.where(drop.to(prompt_embeds.device)[:, None, None], empty, prompt_embeds), drop


def training_step(model, backbone, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Mean loss of a batch: one LoRA per reference applied to its own target row of the frozen backbone.

    `batch`: latents (B, C, f, h, w), prompt_embeds (B, T, D), ref_latents (B, C, f', h', w'), optional
    image_latents (B, f, C, h, w). The backbone's LightLoRA layers must be injected (`prepare_backbone`).
    """
    loras = model.materialize(*model.predict(batch["ref_latents"].to(backbone.device)))
    return batch_loss(model, backbone, batch, generator, loras)


def batch_loss(model, backbone, batch: dict, generator: torch.Generator, loras=None) -> torch.Tensor:
    """Mean diffusion loss of a batch with one LoRA per row (`model.materialize` output), or bare with None."""
    device = backbone.device
    image = batch.get("image_latents")
    args = (batch["latents"].to(device), batch["prompt_embeds"].to(device), None if image is None else image.to(device))
    if loras is None:
        return backbone.training_loss(*args, generator=generator).mean()
    strengths = torch.ones(len(batch["latents"]), device=device)
    with per_sample_loras(backbone.transformer, model.layer_names, loras, strengths):
        return backbone.training_loss(*args, generator=generator).mean()


def prepare_backbone(backbone, model) -> None:
    """Freeze the backbone and wrap the layers the model adapts (idempotent); checks the layouts match."""
    expected = [tuple(l) for l in model.config.layers]
    actual = backbone.lora_layers(model.config.lora.target_modules)
    if expected != actual:
        raise ValueError(f"the model adapts {len(expected)} layers, the {backbone.kind} backbone has {len(actual)}")
    for module in (backbone.transformer, backbone.vae, backbone.pipe.text_encoder):
        module.requires_grad_(False)
    inject_lightlora(backbone.transformer, model.config.lora.target_modules)


def lr_lambda(warmup_steps: int):
    """Constant learning rate after a linear warmup (the paper trains with a constant lr)."""
    warmup = max(0, int(warmup_steps))
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def backbone_fingerprint(backbone) -> str:
    """A cheap checksum of every frozen weight (float64 sums), to prove training leaves the backbone unchanged."""
    acc = []
    for name, module in (("transformer", backbone.transformer), ("vae", backbone.vae), ("text", backbone.pipe.text_encoder)):
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if v.is_floating_point():
                    acc.append(f"{name}.{k}:{v.double().sum().item():.12e}:{v.double().abs().sum().item():.12e}")
    return storage.content_hash("\n".join(acc).encode())


@torch.no_grad()
def eval_loss(model, backbone, data: PreparedData, seed: int = 1234, batch_size: int = 4, repeats: int = 2) -> float:
    """Loss over the prepared set with fixed pairs, timesteps and noise (no dropout): comparable across models."""
    prepare_backbone(backbone, model)
    was_training = model.training
    model.eval()
    pairs = draw_pairs(data.effects, seed, 0) * repeats
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = collate([data.example(t) for t, _ in chunk], [data.example(r) for _, r in chunk])
        g = torch.Generator().manual_seed(step_seed(seed, i, 0))
        total += float(training_step(model, backbone, batch, g)) * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------- metrics table
def metrics_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in METRIC_COLUMNS})
    return buf.getvalue().encode()


def write_metrics(uri: str, rows: list[dict]) -> None:
    storage.write_bytes_atomic(uri, metrics_csv(rows))


def read_metrics(uri: str) -> list[dict]:
    """The metrics table (empty if there is none yet); numbers parsed."""
    if not storage.exists(uri):
        return []
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))
    out = []
    for r in rows:
        out.append({k: (int(v) if k in ("step", "epoch") else float(v)) for k, v in r.items() if v not in ("", None) and k})
    return out


def format_progress(m: dict, max_steps: int, eta_s: float | None = None) -> str:
    eta = f" eta {eta_s / 60:.1f}m" if eta_s is not None and math.isfinite(eta_s) else ""
    return (f"step {m['step']}/{max_steps} epoch {m['epoch']} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"grad_norm {m['grad_norm']:.4f} {m['samples_per_s']:.1f} samples/s{eta}")


# --------------------------------------------------------------------------------------------- the plain loop
def train_single_process(
    model,
    backbone,
    data: PreparedData,
    config: TrainConfig | None = None,
    *,
    max_steps: int | None = None,
    batch_size: int | None = None,
    log_every: int = 10,
    metrics_uri: str | None = None,
) -> list[dict]:
    """The plain loop: fp32 model, torch AdamW, grad clipping, same pairs/schedule/loss as the Ray job.

    `batch_size` is the global batch (use num_workers x per-worker batch to see the samples of a Ray run).
    Returns one metrics dict per step (and writes the table to `metrics_uri` if given).
    """
    cfg = config or TrainConfig()
    max_steps = max_steps or cfg.max_steps
    batch_size = batch_size or cfg.batch_size
    prepare_backbone(backbone, model)
    model.to(backbone.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps))
    rows: list[dict] = []
    start = time.perf_counter()
    for step, epoch, _, pairs in schedule(data.effects, cfg.seed, batch_size, 0, max_steps):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(step_seed(cfg.seed, step, 0))
        batch = collate([data.example(t) for t, _ in pairs], [data.example(r) for _, r in pairs])
        data_wait = time.perf_counter() - t0
        batch["prompt_embeds"], _ = prompt_dropout(batch["prompt_embeds"], data.empty_prompt, cfg.prompt_dropout, g)
        loss = training_step(model, backbone, batch, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        rows.append(dict(step=step, epoch=epoch, loss=float(loss.detach()), lr=lr, grad_norm=float(grad_norm),
                         samples_per_s=len(pairs) / dt, data_wait_s=data_wait, time_s=time.perf_counter() - start))
        if log_every and (step % log_every == 0 or step == max_steps):
            logger.info(format_progress(rows[-1], max_steps))
    if metrics_uri:
        write_metrics(metrics_uri, rows)
    return rows
