"""The per-effect approach that Video2LoRA replaces: one ordinary LoRA trained per effect (a baseline).

Each effect gets its own rank-r LoRA on the same layers the hypernetwork adapts, `y = W x + B A x` with A (r x in)
random-initialised and B (out x r) zero-initialised, trained directly with the frozen backbone's diffusion loss on
that effect's clips. All effects train in one loop: every batch row applies its own effect's LoRA through the
per-sample LightLoRA layers (`video2lora.lightlora`), so 14 LoRAs cost one training run. Saved as one
safetensors file (`<effect>.<layer index>.down/up`) with the layer names and effects in its metadata.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

import torch

from ..lightlora import LayerLoRA, inject_lightlora, per_sample_loras

logger = logging.getLogger(__name__)


class PerEffectLoRAs(torch.nn.Module):
    def __init__(self, effects: list[str], layers: list[tuple[str, int, int]], rank: int = 4, seed: int = 0):
        super().__init__()
        self.effects = list(effects)
        self.layers = [tuple(l) for l in layers]
        self.rank = rank
        g = torch.Generator().manual_seed(seed)
        e = len(self.effects)
        self.down = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(e, rank, i, generator=g) / i**0.5) for _, i, _ in self.layers)
        self.up = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(e, o, rank)) for _, _, o in self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _, _ in self.layers]

    def loras(self, effect_index: torch.Tensor, dtype=None) -> list[LayerLoRA]:
        """Per layer, the LoRAs of the given effects (one row each)."""
        out = []
        for d, u in zip(self.down, self.up):
            dd, uu = d[effect_index], u[effect_index]
            out.append(LayerLoRA(dd if dtype is None else dd.to(dtype), uu if dtype is None else uu.to(dtype)))
        return out

    def index(self, effects: list[str]) -> torch.Tensor:
        return torch.tensor([self.effects.index(e) for e in effects])

    def save(self, path: str) -> None:
        from safetensors.torch import save

        from ..storage import write_bytes_atomic

        tensors = {}
        for k, (d, u) in enumerate(zip(self.down, self.up)):
            tensors[f"down.{k}"] = d.detach().float().cpu().contiguous()
            tensors[f"up.{k}"] = u.detach().float().cpu().contiguous()
        meta = {"format": "video2lora-per-effect-loras", "effects": json.dumps(self.effects),
                "layers": json.dumps(self.layers), "rank": str(self.rank)}
        write_bytes_atomic(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str) -> "PerEffectLoRAs":
        from ..hypernet import load_safetensors_with_metadata
        from ..storage import read_bytes

        tensors, meta = load_safetensors_with_metadata(read_bytes(path), path)
        m = cls(json.loads(meta["effects"]), [tuple(l) for l in json.loads(meta["layers"])], int(meta["rank"]))
        with torch.no_grad():
            for k in range(len(m.layers)):
                m.down[k].copy_(tensors[f"down.{k}"])
                m.up[k].copy_(tensors[f"up.{k}"])
        return m


def validation_split(effects_of_rows: list[str], effects: list[str], fraction: float, seed: int):
    """Per effect, a seeded `fraction` of its clips (at least one, and at least one left to train on) for
    validation; returns (training rows, {effect: validation rows})."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], {}
    for e in effects:
        rows = [i for i, x in enumerate(effects_of_rows) if x == e]
        if len(rows) < 2:
            raise ValueError(f"effect {e!r}: {len(rows)} prepared clip(s); early stopping needs at least 2 "
                             "(one to train on, one to validate)")
        order = [rows[int(k)] for k in torch.randperm(len(rows), generator=g)]
        n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        val[e], train = sorted(order[:n]), train + sorted(order[n:])
    return sorted(train), val


@torch.no_grad()
def validation_losses(backbone, data, model, names, val: dict[str, list[int]], draws: int = 2, batch_size: int = 16,
                      seed: int = 1234) -> dict[str, float]:
    """Per effect, the diffusion loss of its validation clips under its own LoRA. Each effect draws its timesteps and
    noise from its own seeded generator, so they are the same at every call whichever other effects are measured:
    two calls differ only by the LoRAs."""
    out = {}
    for e in sorted(val):
        g = torch.Generator().manual_seed(seed + zlib.crc32(e.encode()))
        items = [i for i in val[e] for _ in range(draws)]
        total = 0.0
        for k in range(0, len(items), batch_size):
            ex = [data.example(i) for i in items[k : k + batch_size]]
            latents = torch.stack([x["latents"] for x in ex]).to(backbone.device)
            embeds = torch.stack([x["prompt_embeds"] for x in ex]).to(backbone.device)
            with per_sample_loras(backbone.transformer, names, model.loras(model.index([e] * len(ex))),
                                  torch.ones(len(ex))):
                total += float(backbone.training_loss(latents, embeds, generator=g).sum())
        out[e] = total / len(items)
    return out


def train_per_effect_loras(backbone, data, effects: list[str] | None = None, target_modules=None, rank: int = 4,
                           steps: int = 600, batch_size: int = 16, lr: float = 2e-3, prompt_dropout: float = 0.1,
                           seed: int = 0, log_every: int = 50, time_budget_s: float | None = None,
                           early_stopping: bool = False, val_fraction: float = 0.2, eval_every: int = 100,
                           patience: int = 4):
    """Train one LoRA per effect on a prepared data set (`video2lora.training.PreparedData`, all splits).

    Without `early_stopping`: `steps` steps on every clip, returns (model, history). With it, each effect gets its
    own budget: a `val_fraction` of its clips is held out, its validation loss (fixed timesteps and noise) is measured
    every `eval_every` steps, it stops being trained after `patience` measurements without a new best, and it keeps
    its best weights (the zero LoRA, i.e. the bare backbone, if training never beat it); `steps` is then the ceiling.
    Returns (model, report) with the history and each effect's best step and losses."""
    from ..training import prompt_dropout as drop_prompts

    row_effects = data.effects  # a list built per access: read once
    effects = effects or sorted(set(row_effects))
    missing = [e for e in effects if e not in set(row_effects)]
    if missing:
        raise ValueError(f"no prepared clip of effect(s) {missing}")
    targets = tuple(target_modules or backbone.lora_targets)
    layers = backbone.lora_layers(targets)
    names = inject_lightlora(backbone.transformer, targets)
    model = PerEffectLoRAs(effects, layers, rank, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    if early_stopping:
        train_rows, val = validation_split(row_effects, effects, val_fraction, seed)
    else:
        train_rows, val = [i for i, e in enumerate(row_effects) if e in effects], {}
    active = set(effects)
    rows = train_rows  # the training rows of the effects still training

    def snapshot(e: str) -> list:
        k = model.effects.index(e)
        return [(d[k].detach().clone(), u[k].detach().clone()) for d, u in zip(model.down, model.up)]
    state: dict[str, dict] = {}
    if val:
        start_losses = validation_losses(backbone, data, model, names, val)
        state = {e: {"best_loss": l, "start_loss": l, "best_step": 0, "best_samples": 0, "bad": 0, "stopped_at": None,
                     "best": snapshot(e)} for e, l in start_losses.items()}
    history, val_history, start, step = [], [], time.perf_counter(), 0
    samples = dict.fromkeys(effects, 0)  # clips each effect has trained on (a batch is shared by the active ones)
    for step in range(1, steps + 1):
        pick = [rows[int(i)] for i in torch.randint(0, len(rows), (batch_size,), generator=g)]
        ex = [data.example(i) for i in pick]
        latents = torch.stack([e["latents"] for e in ex]).to(backbone.device)
        embeds = torch.stack([e["prompt_embeds"] for e in ex])
        embeds, _ = drop_prompts(embeds, data.empty_prompt, prompt_dropout, g)
        for i in pick:
            samples[row_effects[i]] += 1
        idx = model.index([row_effects[i] for i in pick])
        loras = model.loras(idx)
        with per_sample_loras(backbone.transformer, names, loras, torch.ones(batch_size)):
            loss = backbone.training_loss(latents, embeds.to(backbone.device), generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps or step == 1:
            el = time.perf_counter() - start
            history.append({"step": step, "loss": float(loss.detach()), "time_s": el, "active": len(active)})
            logger.info("per-effect LoRAs step %d/%d loss %.4f, %d of %d effects training (%.1fm elapsed)", step,
                        steps, float(loss.detach()), len(active), len(effects), el / 60)
        if val and step % eval_every == 0:
            losses = validation_losses(backbone, data, model, names, {e: val[e] for e in active})
            for e, l in losses.items():
                s = state[e]
                if l < s["best_loss"]:
                    s.update(best_loss=l, best_step=step, best_samples=samples[e], bad=0, best=snapshot(e))
                else:
                    s["bad"] += 1
                    if s["bad"] >= patience:
                        s["stopped_at"] = step
                        active.discard(e)
            val_history.append({"step": step, "val_loss": {e: round(l, 5) for e, l in losses.items()}})
            rows = [i for i in train_rows if row_effects[i] in active]
            if not active:
                logger.info("per-effect LoRAs: every effect stopped on its validation loss at step %d", step)
                break
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            logger.info("per-effect LoRAs: time budget reached at step %d", step)
            break
    if not val:
        return model.eval().requires_grad_(False), history
    with torch.no_grad():  # every effect back to its best validated weights
        for e, s in state.items():
            k = model.effects.index(e)
            for (d, u), (bd, bu) in zip(zip(model.down, model.up), s["best"]):
                d[k].copy_(bd)
                u[k].copy_(bu)
    report = {"history": history, "val_history": val_history, "steps_run": step, "val_fraction": val_fraction, "eval_every": eval_every,
              "patience": patience, "effects": {e: {k: s[k] for k in ("start_loss", "best_loss", "best_step",
                                                                       "best_samples", "stopped_at")}
                                                      for e, s in state.items()}}
    return model.eval().requires_grad_(False), report
