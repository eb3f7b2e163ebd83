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
        import struct

        from ..hypernet import load_safetensors_bytes
        from ..storage import read_bytes

        data = read_bytes(path)
        tensors = load_safetensors_bytes(data, path)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n])["__metadata__"]
        m = cls(json.loads(meta["effects"]), [tuple(l) for l in json.loads(meta["layers"])], int(meta["rank"]))
        with torch.no_grad():
            for k in range(len(m.layers)):
                m.down[k].copy_(tensors[f"down.{k}"])
                m.up[k].copy_(tensors[f"up.{k}"])
        return m


def train_per_effect_loras(backbone, data, effects: list[str] | None = None, target_modules=None, rank: int = 4,
                           steps: int = 600, batch_size: int = 16, lr: float = 2e-3, prompt_dropout: float = 0.1,
                           seed: int = 0, log_every: int = 50, time_budget_s: float | None = None):
    """Train one LoRA per effect on a prepared data set (`video2lora.training.PreparedData`, all splits)."""
    from ..training import prompt_dropout as drop_prompts

    effects = effects or sorted(set(data.effects))
    rows = [i for i, e in enumerate(data.effects) if e in effects]
    if not rows:
        raise ValueError("no prepared clip of the requested effects")
    targets = tuple(target_modules or backbone.lora_targets)
    layers = backbone.lora_layers(targets)
    names = inject_lightlora(backbone.transformer, targets)
    model = PerEffectLoRAs(effects, layers, rank, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        pick = [rows[int(i)] for i in torch.randint(0, len(rows), (batch_size,), generator=g)]
        ex = [data.example(i) for i in pick]
        latents = torch.stack([e["latents"] for e in ex]).to(backbone.device)
        embeds = torch.stack([e["prompt_embeds"] for e in ex])
        embeds, _ = drop_prompts(embeds, data.empty_prompt, prompt_dropout, g)
        idx = model.index([data.effects[i] for i in pick])
        loras = model.loras(idx)
        with per_sample_loras(backbone.transformer, names, loras, torch.ones(batch_size)):
            loss = backbone.training_loss(latents, embeds.to(backbone.device), generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps or step == 1:
            el = time.perf_counter() - start
            history.append({"step": step, "loss": float(loss), "time_s": el})
            logger.info("per-effect LoRAs step %d/%d loss %.4f (%.1fm elapsed, eta %.1fm)", step, steps, float(loss),
                        el / 60, el / step * (steps - step) / 60)
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            logger.info("per-effect LoRAs: time budget reached at step %d", step)
            break
    return model.eval().requires_grad_(False), history
