"""Weight-space warm start of the hypernetwork (HyperDreamBooth-style), before diffusion-loss training.

Trained with the diffusion loss alone from its tiny-init head, the hypernetwork learns a LoRA that ignores the
reference: the loss only rewards knowing the effect through a small, noisy gradient (one timestep and noise draw
per sample), and a generic LoRA is the easy way down. Measured on the synthetic-effects world (docs/EFFECTS.md):
after 900 steps its loss with a reference of the right effect equals the loss with a reference of another effect,
while per-effect LightLoRAs on the same aux matrices reach 0.063 against 0.073 with no LoRA in 600 steps.

So, before the diffusion-loss run (`jobs/train.py --init-checkpoint`):
1. `fit_lora_tables`: one (A_pred, B_pred) per group of clips (the effect label that pairs references) trained
   directly with the diffusion loss, sharing - and training - the model's aux matrices. Fast: every group's
   weights get the whole gradient of its rows.
2. `regress_hypernet`: the hypernetwork learns to predict its reference's group weights from the reference latent
   (a supervised, low-noise signal), so it starts the diffusion-loss run already reading the reference.
The diffusion-loss run then refines the hypernetwork and aux matrices end to end, as in the paper.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import torch

from .data import PreparedData, stack_examples, step_seed
from .loss import batch_loss, prepare_backbone, prompt_dropout

logger = logging.getLogger(__name__)


@dataclass
class LoRATable:
    """One LightLoRA (A_pred (L, r, down), B_pred (L, up, r)) per group, for the model's aux matrices.

    A factorised table (`fit_lora_tables(parts_of=...)`) also keeps one rank-(r/k) LoRA per *part* (`units`), a
    group's LoRA being its k parts' side by side (a sum of their weight updates); it can then make the LoRA of a
    group it never fitted from parts it did (`weights`)."""

    groups: list[str]
    a_pred: torch.Tensor  # (G, L, r, down)
    b_pred: torch.Tensor  # (G, L, up, r)
    units: list[str] | None = None
    a_units: torch.Tensor | None = None  # (U, L, r/k, down)
    b_units: torch.Tensor | None = None  # (U, L, up, r/k)
    parts_of: object = None  # label -> its parts (in rank order)

    def index(self, labels: list[str]) -> torch.Tensor:
        return torch.tensor([self.groups.index(g) for g in labels])

    def weights(self, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_pred, B_pred) of `labels`: fitted groups as fitted, others composed from their parts."""
        if not labels:
            raise ValueError("no labels given")
        if all(g in self.groups for g in labels):
            idx = self.index(labels)
            return self.a_pred[idx], self.b_pred[idx]
        if self.units is None:
            raise KeyError(f"no LoRA for {sorted(set(labels) - set(self.groups))}: not fitted, table not factorised")
        missing = {g: [u for u in self.parts_of(g) if u not in self.units] for g in labels}
        missing = {g: m for g, m in missing.items() if m}
        if missing:
            raise KeyError(f"no LoRA for {sorted(missing)}: parts never fitted {sorted({u for m in missing.values() for u in m})}")
        return _compose(self.a_units, self.b_units, [[self.units.index(u) for u in self.parts_of(g)] for g in labels])

    def to_bytes(self) -> bytes:
        """The table as safetensors (`lora_tables.safetensors` of a warm start): the LoRAs, and the group and part
        names as metadata."""
        from safetensors.torch import save

        tensors = {"a_pred": self.a_pred.contiguous(), "b_pred": self.b_pred.contiguous()}
        meta = {"groups": json.dumps(self.groups)}
        if self.units is not None:
            tensors.update(a_units=self.a_units.contiguous(), b_units=self.b_units.contiguous())
            meta["units"] = json.dumps(self.units)
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, raw: bytes, name: str, parts_of=None) -> LoRATable:
        """A table written by `to_bytes` (safetensors only; `name` names the file in errors). `parts_of` (label ->
        its parts) lets a factorised table compose groups it never fitted."""
        from ..hypernet import load_safetensors_with_metadata

        t, meta = load_safetensors_with_metadata(raw, name)
        try:
            groups, units = json.loads(meta["groups"]), json.loads(meta["units"]) if "units" in meta else None
            a_units, b_units = (t["a_units"], t["b_units"]) if units is not None else (None, None)
            return cls(groups, t["a_pred"], t["b_pred"], units, a_units, b_units, parts_of if units else None)
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}: not a LoRA table (missing or malformed {e})") from None


#: the empty part, as `effects.effect_factors` names a missing one (effects.labels.NONE: "invert" alone is (none,
#: invert)); kept as a literal so training code does not import the effects world. Its LoRA is held at zero, so it
#: may sit in any slot
EMPTY_PART = "none"


def check_factorisation(groups: list[str], parts_of, rank: int) -> list[list[str]]:
    """The parts of every group, refusing what a factorised table cannot hold: groups with different numbers of
    parts, a rank not divisible by that number, or a part other than the empty one that sits in different slots
    (a motion for one label, a look for another)."""
    parts = [list(parts_of(grp)) for grp in groups]
    k = len(parts[0]) if parts else 0
    if not parts or any(len(p) != k for p in parts) or rank % k:
        raise ValueError(f"a factorised table needs every group to have the same number of parts k, and LoRA rank "
                         f"divisible by k (rank {rank}; parts: {dict(zip(groups, parts))})")
    slot: dict[str, int] = {}
    for grp, p in zip(groups, parts):
        for j, u in enumerate(p):
            if u != EMPTY_PART and slot.setdefault(u, j) != j:
                raise ValueError(f"part {u!r} of {grp!r} is in slot {j} but in slot {slot[u]} of another label: "
                                 "a factorised table needs each part in one slot (labels all 'motion+look')")
    return parts


def _compose(a_units: torch.Tensor, b_units: torch.Tensor, members: list[list[int]]):
    """Per row, its parts' LoRAs side by side along the rank: A (B, L, k*r_u, down), B (B, L, up, k*r_u)."""
    m = torch.tensor(members, device=a_units.device)  # (B, k)
    a = torch.cat([a_units[m[:, j]] for j in range(m.shape[1])], dim=2)
    b = torch.cat([b_units[m[:, j]] for j in range(m.shape[1])], dim=3)
    return a, b


def _weight_rows(a: torch.Tensor, b: torch.Tensor, sa, sb) -> torch.Tensor:
    """One row per LoRA: A_pred and B_pred flattened, each scaled by its spread (for nearest-neighbour reads)."""
    return torch.cat([a.flatten(1) / sa, b.flatten(1) / sb], 1)


def _rows_by_group(data: PreparedData, groups: list[str]) -> list[int]:
    return [i for i, g in enumerate(data.effects) if g in groups]


def fit_lora_tables(model, backbone, data: PreparedData, steps: int = 800, batch_size: int = 8, lr: float = 2e-3,
                    seed: int = 0, log_every: int = 100, parts_of=None) -> tuple[LoRATable, list[dict]]:
    """Fit one LightLoRA per group with the diffusion loss; the model's aux matrices train with them (in place).

    A_pred starts at unit norm and B_pred at zero, like an ordinary LoRA (A random, B zero), so the LoRA is zero
    at the start and every group's B gets a gradient from the first step.

    `parts_of(group)` -> its k parts (e.g. `effects.effect_factors`: motion, look): then one rank-(r/k) LoRA is fit
    per part, shared by every group that has it, and a group's LoRA is its parts' side by side. The empty part
    ("none": "zoom_in" alone is (zoom_in, none)) is always exactly zero, in whichever slots it sits: a motion alone
    teaches its motion part only."""
    groups = sorted(set(data.effects))
    prepare_backbone(backbone, model)
    device = backbone.device
    model.to(device).train()
    lc = model.config.lora
    num_layers = len(model.config.layers)
    if parts_of is None:
        units, members, unit_rank = groups, [[k] for k in range(len(groups))], lc.rank
    else:
        parts = check_factorisation(groups, parts_of, lc.rank)
        units = sorted({u for p in parts for u in p})
        members, unit_rank = [[units.index(u) for u in p] for p in parts], lc.rank // len(parts[0])
    g = torch.Generator().manual_seed(seed)
    a_tab = torch.nn.Parameter((torch.randn(len(units), num_layers, unit_rank, lc.down, generator=g) / lc.down**0.5).to(device))
    b_tab = torch.nn.Parameter(torch.zeros(len(units), num_layers, lc.up, unit_rank, device=device))
    # B of the empty part is multiplied by 0 (plain tables have no such unit): its LoRA and its gradients stay zero;
    # its A is zeroed in the table too, so the regression asks the hypernetwork for zeros in that slot
    live = torch.tensor([0.0 if parts_of is not None and u == EMPTY_PART else 1.0 for u in units], device=device)
    live = live[:, None, None, None]
    params = [a_tab, b_tab, *model.a_aux.parameters(), *model.b_aux.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history, start, recent = [], time.perf_counter(), []
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(data.effects), (batch_size,), generator=g).tolist()
        batch = stack_examples([data.example(i) for i in pick])
        gen = torch.Generator().manual_seed(step_seed(seed, step, 0))
        batch["prompt_embeds"], _ = prompt_dropout(batch["prompt_embeds"], data.empty_prompt, 0.1, gen)
        a, b = _compose(a_tab, b_tab * live, [members[groups.index(data.effects[i])] for i in pick])
        loss = batch_loss(model, backbone, batch, gen, model.materialize(a, b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(float(loss.detach()))
        if step == 1 or step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": sum(recent) / len(recent), "time_s": time.perf_counter() - start})
            logger.info("LoRA tables step %d/%d loss %.4f (%.0fs)", step, steps, history[-1]["loss"], history[-1]["time_s"])
            recent = []
    a_units, b_units = (a_tab * live).detach().cpu(), (b_tab * live).detach().cpu()  # the empty part: all zero
    a_groups, b_groups = _compose(a_units, b_units, members)
    if parts_of is None:
        return LoRATable(groups, a_groups, b_groups), history
    return LoRATable(groups, a_groups, b_groups, units, a_units, b_units, parts_of), history


def stacked_latents(data: PreparedData, rows) -> torch.Tensor:
    return torch.stack([data.example(int(r))["latents"] for r in rows]).float()


@torch.no_grad()
def predict_rows(model, data: PreparedData, rows, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (A_pred, B_pred) for these clips, on the CPU; latents read a batch at a time, never all."""
    device = next(model.parameters()).device
    out = [model.predict(stacked_latents(data, rows[i: i + batch_size]).to(device)) for i in range(0, len(rows), batch_size)]
    return torch.cat([a for a, _ in out]).cpu().float(), torch.cat([b for _, b in out]).cpu().float()


def regression_error(model, data: PreparedData, rows, labels: torch.Tensor, table: LoRATable) -> dict:
    """Relative squared error of the predicted weights against their group's, and how often the nearest group
    in weight space is the reference's own (a zero-shot classifier read off the predicted LoRA)."""
    a_t, b_t = table.a_pred, table.b_pred
    sa, sb = a_t.std(), b_t.std()
    a, b = predict_rows(model, data, rows)
    rel = (((a - a_t[labels]) ** 2).mean() / sa**2 + ((b - b_t[labels]) ** 2).mean() / sb**2) / 2
    nearest = torch.cdist(_weight_rows(a, b, sa, sb), _weight_rows(a_t, b_t, sa, sb)).argmin(1)
    return {"relative_error": float(rel), "nearest_group_accuracy": float((nearest == labels).float().mean())}


@torch.no_grad()
def part_accuracy(model, data: PreparedData, table: LoRATable, batch_size: int = 64) -> list[float]:
    """Factorised tables: per rank slot (part), how often the predicted LoRA's slot is nearest (in weight space)
    to the clip's own part among all fitted parts. On compounds never fitted, this says whether the hypernetwork
    reads each part of a new combination (zero-shot, in weight space). Where parts alone were fitted, the empty
    part (zero) is a candidate too: a shrunk prediction lands on it, so those numbers are not comparable with a
    table that has no empty part."""
    if table.units is None:
        raise ValueError("part_accuracy needs a factorised table (fit_lora_tables(parts_of=...))")
    a_u, b_u = table.a_units, table.b_units
    unit_rank = a_u.shape[2]
    sa, sb = a_u.std().clamp_min(1e-12), b_u.std().clamp_min(1e-12)
    units = _weight_rows(a_u, b_u, sa, sb)  # one row per fitted part
    hits = None
    for i in range(0, len(data.index), batch_size):
        rows = list(range(i, min(i + batch_size, len(data.index))))
        a, b = predict_rows(model, data, rows, batch_size)
        parts = [table.parts_of(data.effects[r]) for r in rows]
        slots = a.shape[2] // unit_rank
        if hits is None:
            hits = [0] * slots
        for j in range(slots):
            cols = slice(j * unit_rank, (j + 1) * unit_rank)
            nearest = torch.cdist(_weight_rows(a[:, :, cols], b[..., cols], sa, sb), units).argmin(1).tolist()
            hits[j] += sum(table.units[n] == p[j] for n, p in zip(nearest, parts))
    return [h / max(1, len(data.index)) for h in hits or []]


def regress_hypernet(model, data: PreparedData, table: LoRATable, steps: int = 1500, batch_size: int = 32,
                     lr: float = 1e-3, weight_decay: float = 0.03, seed: int = 0, val_fraction: float = 0.2,
                     log_every: int = 250, device: str | torch.device = "cpu") -> list[dict]:
    """Train the hypernetwork (only) to predict each reference's group weights from its latent (AdamW, the rate
    decaying from `lr` to zero on a cosine).

    A fixed `val_fraction` of every group's clips is held out of the fit and reported (error and nearest-group
    accuracy), so a hypernetwork that memorises clips instead of reading effects shows it."""
    rows = _rows_by_group(data, table.groups)
    val = rows[:: max(1, round(1 / val_fraction))] if val_fraction > 0 else []
    held_out = set(val)
    fit = [i for i in rows if i not in held_out]
    position = {r: k for k, r in enumerate(rows)}
    labels = table.index([data.effects[i] for i in rows])
    rows_t = torch.tensor(rows, dtype=torch.long)
    model.to(device).train()
    a_t, b_t = table.a_pred.to(device), table.b_pred.to(device)
    sa, sb = a_t.std(), b_t.std()
    params = list(model.hypernet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # cosine to zero: at a constant rate the run ended wherever its last spike left it (a rerun of the shipped
    # recipe: relative error 0.15 at step 1250, 0.41 at the end; docs/measurements/rerun_2026-12-08)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    history, start = [], time.perf_counter()

    fit_idx = torch.tensor([position[i] for i in fit])
    val_idx = torch.tensor([position[i] for i in val], dtype=torch.long)

    def report(step: int, loss: float | None) -> None:
        model.eval()
        row = {"step": step, "loss": loss, "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - start,
               "fit": regression_error(model, data, rows_t[fit_idx].tolist(), labels[fit_idx], table)}
        if val:
            row["val"] = regression_error(model, data, rows_t[val_idx].tolist(), labels[val_idx], table)
        model.train()
        history.append(row)
        logger.info("hypernetwork regression step %d/%d: fit %s, held-out clips %s (%.0fs)", step, steps,
                    row["fit"], row.get("val"), row["time_s"])

    report(0, None)  # where it starts, so the report shows what the regression gained
    for step in range(1, steps + 1):
        pick = fit_idx[torch.randint(0, len(fit), (batch_size,), generator=g)]
        a, b = model.predict(stacked_latents(data, rows_t[pick].tolist()).to(device), g)  # this batch's clips only
        lab = labels[pick].to(device)
        loss = (((a - a_t[lab]) ** 2).mean() / sa**2 + ((b - b_t[lab]) ** 2).mean() / sb**2) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            report(step, float(loss.detach()))
    model.eval()
    return history


@torch.no_grad()
def effect_losses(model, backbone, data: PreparedData, weights_of, seed: int = 1234, batch_size: int = 8,
                  max_rows: int | None = None) -> dict:
    """Diffusion loss of the clips (fixed timesteps and noise) with no LoRA, with the LoRA of a reference of the
    same effect, and with the LoRA of a reference of another effect. `weights_of(reference_rows)` gives
    (A_pred, B_pred) for those rows. own < none says the LoRA helps; own < other says it carries the effect."""
    import numpy as np

    prepare_backbone(backbone, model)
    device = backbone.device
    labels = data.effects
    rng = np.random.default_rng(seed)
    rows = list(range(len(labels)))
    if max_rows and len(rows) > max_rows:
        rows = sorted(rng.choice(rows, max_rows, replace=False).tolist())
    own, other = [], []
    for t in rows:
        same = [k for k in range(len(labels)) if labels[k] == labels[t] and k != t] or [t]
        diff = [k for k in range(len(labels)) if labels[k] != labels[t]]
        own.append(int(rng.choice(same)))
        other.append(int(rng.choice(diff)) if diff else t)
    totals = {"none": 0.0, "own_effect": 0.0, "other_effect": 0.0}
    margins = []  # per batch: other-effect minus own-effect loss (same clips, timesteps and noise: paired)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = {k: v.to(device) for k, v in stack_examples([data.example(t) for t in chunk]).items()}  # once, not 3x
        losses = {}
        for name, refs in (("none", None), ("own_effect", own[i : i + batch_size]), ("other_effect", other[i : i + batch_size])):
            gen = torch.Generator().manual_seed(step_seed(seed, i, 0))  # same timesteps and noise for all three
            loras = None if refs is None else model.materialize(*(w.to(device) for w in weights_of(refs)))
            losses[name] = float(batch_loss(model, backbone, batch, gen, loras))
            totals[name] += losses[name] * len(chunk)
        margins.append(losses["other_effect"] - losses["own_effect"])
    out = {k: v / len(rows) for k, v in totals.items()}
    # the standard error of the mean margin over batches: is "own < other" more than noise?
    out["margin_se"] = float(np.std(margins, ddof=1) / np.sqrt(len(margins))) if len(margins) > 1 else float("nan")
    return out


def table_weights(data: PreparedData, table: LoRATable):
    return lambda refs: table.weights([data.effects[r] for r in refs])


def hypernet_weights(data: PreparedData, model):
    def weights_of(refs):
        latents = torch.stack([data.example(r)["latents"] for r in refs]).to(next(model.parameters()).device)
        return model.predict(latents)
    return weights_of
