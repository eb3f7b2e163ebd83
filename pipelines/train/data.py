"""Data streaming to the workers. Each worker streams its rows of every global batch from the prepared shards
through a Ray Data pipeline (reader tasks, order preserved), in the deterministic order of
`video2lora.training.schedule`, so the data position follows from the step alone."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from video2lora.training import PreparedData, ShardReader, schedule


class LoadPairs:
    """Ray Data actor: (target, reference) ids -> target latents/prompt embedding (+ first-frame latents) and the
    reference latents, read from the prepared shards by range requests; a byte-bounded cache of examples."""

    def __init__(self, prepared_uri: str, fields: tuple[str, ...], cache_bytes: int = 1 << 30):
        self.reader = ShardReader(prepared_uri)
        self.fields = tuple(fields)
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self.used = cache_bytes, 0

    def _get(self, shard: str, clip_id: str, fields: tuple[str, ...]) -> dict:
        key = (clip_id, fields)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        ex = {k: v.numpy() for k, v in self.reader.example(shard, clip_id, fields).items()}
        self.cache[key] = ex
        self.used += sum(v.nbytes for v in ex.values())
        while self.used > self.cache_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.used -= sum(v.nbytes for v in old.values())
        return ex

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {f: [] for f in self.fields}
        out["ref_latents"] = []
        for i in range(len(batch["step"])):
            t = self._get(str(batch["target_shard"][i]), str(batch["target_id"][i]), self.fields)
            r = self._get(str(batch["ref_shard"][i]), str(batch["ref_id"][i]), ("latents",))
            for f in self.fields:
                out[f].append(t[f])
            out["ref_latents"].append(r["latents"])
        return {"step": batch["step"], **{k: np.stack(v) for k, v in out.items()}}


_LOADERS: "OrderedDict[tuple, LoadPairs]" = OrderedDict()


def load_pairs(batch: dict[str, np.ndarray], prepared_uri: str, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Ray Data task: LoadPairs kept per process, so pooled Ray workers reuse their shard headers and example cache
    across tasks (and across runs), with no dedicated actor to start."""
    key = (prepared_uri, tuple(fields))
    if key not in _LOADERS:
        _LOADERS[key] = LoadPairs(prepared_uri, tuple(fields), cache_bytes=256 << 20)
        while len(_LOADERS) > 2:
            _LOADERS.popitem(last=False)
    return _LOADERS[key](batch)


def worker_rows(data: PreparedData, seed: int, global_batch: int, batch_size: int, rank: int,
                start_step: int, end_step: int) -> list[dict]:
    """This rank's rows of every global batch from start_step+1 to end_step, in training order."""
    rows = []
    for step, _, _, pairs in schedule(data.effects, seed, global_batch, start_step, end_step):
        for t, r in pairs[rank * batch_size : (rank + 1) * batch_size]:
            rows.append({"step": step, "target_id": data.index[t]["clip_id"], "target_shard": data.index[t]["shard"],
                         "ref_id": data.index[r]["clip_id"], "ref_shard": data.index[r]["shard"]})
    return rows


def stream_batches(data: PreparedData, rows: list[dict], batch_size: int, num_cpus: float, chunk_steps: int = 500):
    """Stream this rank's batches through Ray Data (order preserved), one pipeline per chunk of steps."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    per_chunk = chunk_steps * batch_size
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start : start + per_chunk]
        ds = ray.data.from_items(chunk, override_num_blocks=max(1, math.ceil(len(chunk) / (batch_size * 4))))
        ds = ds.map_batches(load_pairs, fn_kwargs={"prepared_uri": data.uri, "fields": data.fields},
                            batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                            compute=ray.data.TaskPoolStrategy(size=2))
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4)


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (errors are re-raised in the consumer)."""

    _END = object()

    def __init__(self, iterator, depth: int = 4):
        import queue
        import threading

        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="data-prefetch")
        self.thread.start()

    def _run(self, iterator) -> None:
        try:
            for item in iterator:
                self.queue.put(item)
        except BaseException as e:  # handed to the training loop
            self.queue.put(e)
            return
        self.queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
