"""The prepared data and the order it is read in (no Ray, no DeepSpeed).

* The prepared data format: what `pipelines/prepare.py` writes once per (manifest, backbone, clip size) and every
  training epoch reads -- VAE latents, prompt embeddings and first-frame latents as safetensors shards, an index,
  the empty prompt's embedding, and `prepared.json` (written last: its presence means the set is complete).
* Pairing as in the paper: each target clip is paired with another clip of the same effect as its reference,
  re-drawn every epoch from a seeded RNG, never the clip itself when its effect has other clips.
* A deterministic schedule: global step -> (epoch, offset) -> the global batch of pairs; rank r of W takes rows
  [r*B, (r+1)*B). A plain loop with batch W*B therefore sees exactly the samples of a W-worker run.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import storage
from ..hypernet import load_safetensors_bytes

logger = logging.getLogger(__name__)

PREPARED_FORMAT = 1
PREPARED_NAME = "prepared.json"
INDEX_NAME = "index.parquet"
ERRORS_NAME = "errors.parquet"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
SHARDS_DIR = "shards"
TENSOR_FIELDS = ("latents", "prompt_embeds", "image_latents")


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
    _cache: dict = field(default_factory=dict, repr=False)  # examples given in memory (kept; e.g. tests)
    # examples read from the shards, least recently used dropped first: at 5B sizes a clip is ~17 MB of latents,
    # so a real training set never fits; the bound keeps memory flat however many clips there are
    max_cache_bytes: int = 1 << 30
    _read: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _read_bytes: int = field(default=0, repr=False)

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
        """Tensors of index row i, through a bounded cache (a small prepared set stays in memory whole)."""
        if i in self._cache:
            return self._cache[i]
        if i in self._read:
            self._read.move_to_end(i)
            return self._read[i]
        if self._reader is None:
            self._reader = ShardReader(self.uri)
        row = self.index[i]
        example = self._reader.example(row["shard"], row["clip_id"], self.fields)
        self._read[i] = example
        self._read_bytes += example_bytes(example)
        while self._read_bytes > self.max_cache_bytes and len(self._read) > 1:
            _, dropped = self._read.popitem(last=False)
            self._read_bytes -= example_bytes(dropped)
        return example

    @property
    def cached_examples(self) -> int:
        return len(self._read)


def example_bytes(example: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in example.values())


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


def stack_examples(examples: list[dict[str, torch.Tensor]]) -> dict:
    """Prepared examples -> one batch dict (latents, prompt_embeds, image_latents for I2V)."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def collate(examples: list[dict[str, torch.Tensor]], references: list[dict[str, torch.Tensor]]) -> dict:
    batch = stack_examples(examples)
    batch["ref_latents"] = torch.stack([r["latents"] for r in references])
    return batch
