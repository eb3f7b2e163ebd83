"""Independent judge for the procedural effects world (:mod:`video2lora.effects`).

A small 3D CNN reads a clip ``(3, F, H, W)`` in ``[-1, 1]`` and predicts

* ``effect``      - which effect animates the clip (the thing Video2LoRA must transfer),
* ``shape``, ``colour``, ``background`` - the content, to measure fidelity to the prompt.

It is trained on real rendered clips only (never on generated videos), with mild
noise / blur / brightness augmentation so it tolerates the softness of generated
videos.  Inputs of another size or frame count are resampled to the configured
``num_frames x input_size x input_size`` first.

Artifacts: ``save(dir)`` writes ``config.json`` + ``model.safetensors`` (no pickle);
``EffectClassifier.load(dir)`` reads them back.  ``dir`` may be a local path or any
fsspec URL.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import storage
from . import world as fx

__all__ = [
    "HEADS",
    "ClassifierConfig",
    "EffectClassifier",
    "default_vocab",
    "records_to_arrays",
    "train_classifier",
    "train_from_records",
    "evaluate",
    "evaluate_records",
    "per_class_accuracy",
    "save",
    "load",
]

HEADS: tuple[str, ...] = ("effect", "shape", "colour", "background")
CONTENT_HEADS: tuple[str, ...] = ("shape", "colour", "background")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def default_vocab(head: str) -> list[str]:
    """Fixed label order per head (from :mod:`video2lora.effects`)."""
    return {
        "effect": list(fx.ALL_LABELS),
        "shape": list(fx.SHAPES),
        "colour": list(fx.COLOURS),
        "background": list(fx.BACKGROUNDS),
    }[head]


@dataclass
class ClassifierConfig:
    heads: dict[str, list[str]] = field(default_factory=lambda: {h: default_vocab(h) for h in HEADS})
    num_frames: int = 9
    input_size: int = 32
    width: int = 16  # motion (3D) branch base width
    content_width: int = 24  # content (2D) branch base width
    hidden: int = 256
    dropout: float = 0.1
    content_frames: int = 2  # first frames read by the content branch (0 = all)

    def to_json(self) -> str:
        return json.dumps({"model_type": "video2lora-effect-classifier", **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ClassifierConfig":
        d = json.loads(text)
        d.pop("model_type", None)
        return cls(**d)


def _block(cin: int, cout: int, stride) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


def _block2d(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class EffectClassifier(nn.Module):
    """Two branches.

    * motion branch (``effect`` head): 3D CNN, four conv blocks (spatial 32 -> 4,
      time 9 -> 5), spatial avg+max pooling that keeps the time axis (so *when*
      something happens is visible), an MLP.
    * content branch (``shape``/``colour``/``background`` heads): a full-resolution
      2D CNN applied to the first ``content_frames`` frames, spatial avg+max pooling,
      learned soft attention over those frames, an MLP.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        self.motion_heads = [h for h in config.heads if h not in CONTENT_HEADS]
        self.content_heads = [h for h in config.heads if h in CONTENT_HEADS]
        if self.motion_heads:
            w = config.width
            self.features = nn.Sequential(
                _block(3, w, (1, 2, 2)),
                _block(w, 2 * w, (1, 2, 2)),
                _block(2 * w, 2 * w, 1),
                _block(2 * w, 4 * w, (2, 2, 2)),
            )
            t_out = (config.num_frames - 1) // 2 + 1
            self.trunk = nn.Sequential(
                nn.Flatten(),
                nn.Dropout(config.dropout),
                nn.Linear(2 * 4 * w * t_out, config.hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(config.dropout),
            )
        if self.content_heads:
            cw = config.content_width
            self.content = nn.Sequential(
                _block2d(3, cw, 1),
                _block2d(cw, 2 * cw, 2),
                _block2d(2 * cw, 2 * cw, 1),
                _block2d(2 * cw, 4 * cw, 2),
            )
            self.frame_score = nn.Linear(8 * cw, 1)
            self.content_trunk = nn.Sequential(
                nn.Dropout(config.dropout),
                nn.Linear(8 * cw, config.hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(config.dropout),
            )
        self.heads = nn.ModuleDict({h: nn.Linear(config.hidden, len(v)) for h, v in config.heads.items()})

    # ------------------------------------------------------------------ forward
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,F,H,W) or (3,F,H,W) in [-1,1] -> resampled (B,3,T,S,S) float32."""
        if x.dim() == 4:
            x = x.unsqueeze(0)
        x = x.float()
        b, c, f, h, w = x.shape
        S, T = self.config.input_size, self.config.num_frames
        if (h, w) != (S, S):
            y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            y = F.interpolate(y, size=(S, S), mode="bilinear", align_corners=False, antialias=min(h, w) > S)
            x = y.reshape(b, f, c, S, S).permute(0, 2, 1, 3, 4)
        if f != T:
            x = F.interpolate(x, size=(T, S, S), mode="trilinear", align_corners=False)
        return x.contiguous()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(x)
        out: dict[str, torch.Tensor] = {}
        if self.motion_heads:
            z = self.features(x)  # (B, C, T', s, s)
            z = torch.cat([z.mean(dim=(3, 4)), z.amax(dim=(3, 4))], dim=1)  # (B, 2C, T')
            z = self.trunk(z)
            out.update({h: self.heads[h](z) for h in self.motion_heads})
        if self.content_heads:
            b = x.shape[0]
            k = self.config.content_frames or x.shape[2]
            fr = x[:, :, :k].permute(0, 2, 1, 3, 4).reshape(b * k, 3, x.shape[3], x.shape[4])
            c = self.content(fr)
            c = torch.cat([c.mean(dim=(2, 3)), c.amax(dim=(2, 3))], dim=1).reshape(b, k, -1)
            att = self.frame_score(c).softmax(dim=1)  # (B, k, 1)
            c = self.content_trunk((att * c).sum(1))
            out.update({h: self.heads[h](c) for h in self.content_heads})
        return out

    @torch.no_grad()
    def predict_proba(self, clips, batch_size: int = 128) -> dict[str, np.ndarray]:
        was = self.training
        self.eval()
        x = _as_tensor(clips)
        outs: dict[str, list[torch.Tensor]] = {h: [] for h in self.heads}
        for i in range(0, len(x), batch_size):
            for h, logits in self(x[i : i + batch_size]).items():
                outs[h].append(logits.softmax(-1))
        self.train(was)
        return {h: torch.cat(v).numpy() for h, v in outs.items()}

    def predict(self, clips, batch_size: int = 128) -> dict[str, list[str]]:
        """Label names per head for a batch of clips (N,3,F,H,W) / list of (3,F,H,W)."""
        probs = self.predict_proba(clips, batch_size)
        return {h: [self.config.heads[h][i] for i in p.argmax(-1)] for h, p in probs.items()}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        save(self, path)

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> "EffectClassifier":
        return load(path, map_location)


# ---------------------------------------------------------------------- persistence
def save(model: EffectClassifier, path: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` under directory ``path``."""
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes_atomic(storage.join(path, WEIGHTS_NAME), st_save(state, metadata={"format": "pt"}))
    storage.write_bytes_atomic(storage.join(path, CONFIG_NAME), model.config.to_json().encode())


def load(path: str, map_location: str = "cpu") -> EffectClassifier:
    from safetensors.torch import load as st_load

    config = ClassifierConfig.from_json(storage.read_bytes(storage.join(path, CONFIG_NAME)).decode())
    model = EffectClassifier(config)
    state = st_load(storage.read_bytes(storage.join(path, WEIGHTS_NAME)))
    model.load_state_dict(state)
    return model.to(map_location).eval()


# ---------------------------------------------------------------------- data helpers
def _as_tensor(clips) -> torch.Tensor:
    if isinstance(clips, torch.Tensor):
        x = clips
    elif isinstance(clips, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(clips))
    else:
        x = torch.stack([c if isinstance(c, torch.Tensor) else torch.from_numpy(np.asarray(c)) for c in clips])
    if x.dim() == 4:
        x = x.unsqueeze(0)
    return x.float()


def records_to_arrays(records: Sequence[Mapping]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """``effects.make_dataset`` records -> (clips (N,3,F,H,W), labels per head)."""
    clips = np.stack([r["video"] for r in records]).astype(np.float32)
    labels = {h: [str(r[h]) for r in records] for h in HEADS if all(h in r for r in records)}
    return clips, labels


def _normalise_labels(labels) -> dict[str, list[str]]:
    if isinstance(labels, Mapping):
        return {h: [str(v) for v in vals] for h, vals in labels.items() if vals is not None}
    return {"effect": [str(v) for v in labels]}


# ---------------------------------------------------------------------- augmentation
def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable blur. x (B,C,F,H,W), sigma (B,) in pixels (0 = none)."""
    b, c, f, h, w = x.shape
    r = 2
    k = torch.arange(-r, r + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    ker = torch.exp(-(k[None] ** 2) / (2 * s * s))
    ker = ker / ker.sum(-1, keepdim=True)  # (B, 2r+1)
    ker = ker.repeat_interleave(c * f, 0)  # (B*C*F, 2r+1)
    y = x.reshape(1, b * c * f, h, w)
    y = F.pad(y, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, ker[:, None, None, :], groups=b * c * f)
    y = F.conv2d(y, ker[:, None, :, None], groups=b * c * f)
    return y.reshape(b, c, f, h, w)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    blur_on = (u(b) < 0.4).float()
    x = _gaussian_blur(x, blur_on * u(b) * 0.9)
    gain = 1.0 + (u(b, 1, 1, 1, 1) - 0.5) * 0.2
    bias = (u(b, 1, 1, 1, 1) - 0.5) * 0.1
    x = x * gain + bias
    noise = u(b, 1, 1, 1, 1) * 0.08
    x = x + noise * torch.randn(x.shape, generator=g)
    return x.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------- training / eval
def train_classifier(
    clips,
    labels,
    epochs: int = 15,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    config: ClassifierConfig | None = None,
    head_weights: Mapping[str, float] | None = None,
    num_threads: int | None = None,
    verbose: bool = False,
) -> EffectClassifier:
    """Train a classifier on real clips.

    ``clips``: (N,3,F,H,W) array/tensor or a list of (3,F,H,W) clips, pixels in [-1,1].
    ``labels``: a sequence of effect names, or a dict ``head -> sequence of names``
    for any of ``effect, shape, colour, background``.  Heads without labels are not
    built.  Label vocabularies default to the fixed orders of :mod:`video2lora.effects`
    (extended by any unseen names).  Deterministic for a given ``seed`` and thread count.
    """
    if num_threads:
        torch.set_num_threads(int(num_threads))
    labels = _normalise_labels(labels)
    x = _as_tensor(clips)
    n = len(x)
    for h, v in labels.items():
        if len(v) != n:
            raise ValueError(f"{len(v)} {h} labels for {n} clips")
    if config is None:
        heads = {}
        for h, vals in labels.items():
            vocab = default_vocab(h) if h in HEADS else []
            vocab += [v for v in dict.fromkeys(vals) if v not in vocab]
            heads[h] = vocab
        config = ClassifierConfig(heads=heads, num_frames=int(x.shape[2]))
    missing = [h for h in labels if h not in config.heads]
    if missing:
        raise ValueError(f"no head for labels {missing}")
    y = {h: torch.tensor([config.heads[h].index(v) for v in vals]) for h, vals in labels.items()}
    hw = {"effect": 1.0, "shape": 1.0, "colour": 0.5, "background": 0.5}
    hw.update(head_weights or {})

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = EffectClassifier(config)
    x = model.prepare(x)  # resample once
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.2
    )
    model.train()
    t0 = time.time()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs >1 sample
                continue
            xb = x[idx]
            if augment:
                xb = _augment(xb, g)
            out = model(xb)
            loss = sum(hw.get(h, 0.5) * F.cross_entropy(out[h], y[h][idx]) for h in y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            if "effect" in y:
                correct += int((out["effect"].argmax(-1) == y["effect"][idx]).sum())
        if verbose:
            print(f"epoch {ep + 1}/{epochs} loss {tot / n:.3f} train-effect-acc {correct / n:.3f} ({time.time() - t0:.1f}s)")
    return model.eval()


def train_from_records(records: Sequence[Mapping], **kw) -> EffectClassifier:
    clips, labels = records_to_arrays(records)
    return train_classifier(clips, labels, **kw)


def evaluate(model: EffectClassifier, clips, labels, batch_size: int = 128) -> dict[str, float]:
    """Accuracy per head for the heads that have labels (a sequence = effect labels)."""
    labels = _normalise_labels(labels)
    pred = model.predict(clips, batch_size)
    return {h: float(np.mean([p == t for p, t in zip(pred[h], vals)])) for h, vals in labels.items() if h in pred}


def evaluate_records(model: EffectClassifier, records: Sequence[Mapping], batch_size: int = 128) -> dict[str, float]:
    clips, labels = records_to_arrays(records)
    return evaluate(model, clips, labels, batch_size)


def per_class_accuracy(pred: Iterable[str], truth: Iterable[str]) -> dict[str, float]:
    """Accuracy per true class."""
    hits: dict[str, list[bool]] = {}
    for p, t in zip(pred, truth):
        hits.setdefault(t, []).append(p == t)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
