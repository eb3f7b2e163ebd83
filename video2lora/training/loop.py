"""The plain single-process training loop (the baseline and a test oracle) and the metrics table."""

from __future__ import annotations

import csv
import io
import logging
import math
import time

import torch

from .. import storage
from ..config import TrainConfig
from .data import PreparedData, collate, schedule, step_seed
from .loss import lr_lambda, prepare_backbone, prompt_dropout, training_step

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "data_wait_s", "time_s")


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
