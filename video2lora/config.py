"""Typed configuration, in one place. Defaults reproduce the paper (Video2LoRA, arXiv 2603.08210)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


class InputError(ValueError):
    """A request a user made cannot be served; `field` names the input at fault (a manifest column, a form
    field), so a batch row fails with it and an HTTP request gets a 4xx naming it. The message is unchanged."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class LoRAConfig:
    """LightLoRA: A = A_pred @ A_aux (r x in), B = B_aux @ B_pred (out x r), scaled by alpha / r."""

    rank: int = 1
    down: int = 100  # rows of A_aux, A_pred is (rank x down)
    up: int = 50  # columns of B_aux, B_pred is (up x rank)
    alpha: float = 1.0
    # fnmatch patterns over module names of the DiT; default: attention q/k/v/out of every block
    target_modules: tuple[str, ...] = (
        "transformer_blocks.*.attn1.to_q",
        "transformer_blocks.*.attn1.to_k",
        "transformer_blocks.*.attn1.to_v",
        "transformer_blocks.*.attn1.to_out.0",
    )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def pred_size(self) -> int:
        """Floats predicted per adapted layer: A_pred (r x down) and B_pred (up x r)."""
        return self.rank * self.down + self.up * self.rank


HEAD_INITS = ("tiny", "lora")  # HyperConfig.head_init
REFERENCE_FEATURES = ("latent", "frame_norm", "correlation")  # HyperConfig.reference_features


@dataclass
class HyperConfig:
    """The hypernetwork: video latent tokens -> weight tokens -> (A_pred, B_pred) per layer."""

    width: int = 150
    num_blocks: int = 4
    num_heads: int = 6
    mlp_ratio: float = 4.0
    iterations: int = 3  # refinement iterations: each predicts a delta on the previous weights
    latent_patch: int = 2  # spatial patch of the latent grid per video token
    head_init_std: float = 1e-3  # std of the prediction head's weights for head_init "tiny"
    encoder_blocks: int = 0  # self-attention blocks over the video tokens before the decoder reads them (0: paper)
    stem_channels: int = 0  # >0: two 3x3x3 convolutions over the latent before it is cut into tokens (0: paper)
    max_video_tokens: int = 4096  # positional table size for video tokens
    # "tiny" (the paper's): every head weight N(0, head_init_std), so A_pred and B_pred both start tiny and the
    # gradient of their product starts near zero. "lora": the usual LoRA init - the head rows that produce A_pred
    # random (A_pred rows of about unit norm after the refinement iterations, as the warm start's tables), B_pred's
    # zero: the predicted LoRA is exactly zero at the start, but B_pred's rows get a gradient from the first step
    head_init: str = "tiny"
    # what the hypernetwork reads of the reference latent, stacked as channels: "latent" (the paper's: the latent
    # as it is), "frame_norm" (each frame standardised per channel over space: a per-frame scale (> 0) and shift of
    # a latent channel, e.g. a fade, does not move it) and "correlation" (cosine similarity of each position with
    # the previous frame's positions within correlation_radius: motion, unchanged by such scales and shifts).
    # Measured in docs/measurements/reference_features_2026-12-06/: a look that changes every frame's colour or
    # brightness hid a held-out compound's motion from "latent" alone.
    reference_features: tuple[str, ...] = ("latent",)
    correlation_radius: int = 2
    # two hypernetworks of this size instead of one: the first half of the LoRA rank (the motion slot of the
    # factorised warm start) predicted from the reference with its look randomised in training (channels mixed,
    # frames blurred or pixelated: hypernet.randomise_look), the second half from the reference as it is. Each
    # learns its own slot only (docs/EFFECTS.md, "Two hypernetworks"). Needs an even rank
    motion_stream: bool = False

    def __post_init__(self):
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"hyper.head_init {self.head_init!r}: expected one of {HEAD_INITS}")
        features = self.reference_features
        if (not isinstance(features, (list, tuple)) or not features or len(set(features)) < len(features)
                or any(f not in REFERENCE_FEATURES for f in features)):
            raise ValueError(f"hyper.reference_features {features!r}: expected a list of distinct names from "
                             f"{list(REFERENCE_FEATURES)}, at least one")
        self.reference_features = tuple(features)
        radius = self.correlation_radius
        if isinstance(radius, bool) or not isinstance(radius, int) or not 0 <= radius <= 8:
            raise ValueError(f"hyper.correlation_radius {radius!r}: expected an integer from 0 to 8")
        if not isinstance(self.motion_stream, bool):
            raise ValueError(f"hyper.motion_stream {self.motion_stream!r}: expected true or false")


@dataclass
class GenerationConfig:
    """Inference settings of the paper: DDIM, 50 steps, CFG 6, 49 frames."""

    num_frames: int = 49
    height: int = 480
    width: int = 720
    steps: int = 50
    guidance_scale: float = 6.0
    lora_strength: float = 1.0
    negative_prompt: str = ""
    fps: int = 8
    seed: int = 0
    vae_tiling: bool | None = None  # None: on when the frame size is large (> 256 px on a side)
    # cheaper steps (video2lora/backbones/step_cost.py; measured in docs/BENCHMARKS.md item 8 and
    # docs/measurements/step_cost_quality.md): a diffusers step cache, none | pyramid_attention | faster |
    # taylorseer | first_block | magcache. `interval`: attention recomputed every Nth step (pyramid_attention,
    # faster, taylorseer), or at most N-1 steps reused in a row (magcache); `timesteps`: the window (0-1000 scale)
    # where outputs may be reused; `threshold`: first_block's relative change, or magcache's error budget.
    # Left unset (None), each takes the chosen cache's measured setting (step_cost.CACHE_DEFAULTS).
    # Default: magcache 0.3, at least every 4th step, the first fifth of the steps always computed: 0.39x the DiT
    # compute of the stock pipeline on the small preset; on the trained effects backbone effect accuracy and content
    # fidelity within about one standard error of the exact sampler's; "none" is the paper's sampler exactly
    step_cache: str = "magcache"
    step_cache_interval: int | None = None  # magcache: 4
    step_cache_timesteps: tuple[int, int] | None = None  # magcache: (100, 800)
    step_cache_threshold: float | None = None  # magcache: 0.3
    compile_blocks: bool = False  # torch.compile each transformer block (LoRAs are graph inputs: no recompiles)
    fuse_qkv: bool = False  # one q/k/v GEMM and one LoRA down-projection per attention
    # refine each predicted LoRA on its own reference before generating (video2lora/refine.py): Adam steps of the
    # diffusion loss on `refine_draws` noised copies of the reference, A_pred and B_pred only. 0: zero-shot, the
    # paper's method. Costs refine_steps forward and backward DiT passes per reference, not per video
    refine_steps: int = 0
    refine_lr: float = 3e-3
    refine_draws: int = 2
    # steps instead for a reference the hypernetwork's LoRA fits worse than no LoRA (refine.reference_fit above
    # refine.UNFAMILIAR_ABOVE; its kind of effect was likely never in training): None = refine_steps for every one.
    # Measured: a kind never seen gains from 160 steps, known kinds do not (docs/EFFECTS.md)
    refine_steps_unfamiliar: int | None = None
    # measure each refinable reference's fit (refine.reference_fit, 16 DiT forward passes per reference) without
    # refining it, for a zero-shot job to flag the references it likely does not know; on by itself with
    # refine_steps_unfamiliar
    measure_reference_fit: bool = False

    @property
    def reads_reference_latents(self) -> bool:
        """Whether generation reads each reference's latents: to refine its LoRA, or to measure its fit."""
        return bool(self.refine_steps) or self.measures_fit

    @property
    def measures_fit(self) -> bool:
        return self.measure_reference_fit or self.refine_steps_unfamiliar is not None

    def __post_init__(self):
        steps, draws, lr = self.refine_steps, self.refine_draws, self.refine_lr
        for name, n in (("refine_steps", steps), ("refine_steps_unfamiliar", self.refine_steps_unfamiliar)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 10_000):
                raise ValueError(f"{name}={n!r}: expected a whole number from 0 to 10000")
        if steps is None:
            raise ValueError("refine_steps=None: expected a whole number from 0 to 10000")
        if not isinstance(self.measure_reference_fit, bool):
            raise ValueError(f"measure_reference_fit={self.measure_reference_fit!r}: expected true or false")
        if self.refine_steps_unfamiliar is not None and not steps:
            raise ValueError(f"refine_steps_unfamiliar={self.refine_steps_unfamiliar}: it sets the steps of the "
                             "unfamiliar references of a refining job; set refine_steps > 0 too")
        if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= 64:
            raise ValueError(f"refine_draws={draws!r}: expected a whole number from 1 to 64")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1:
            raise ValueError(f"refine_lr={lr!r}: expected a number in (0, 1]")


@dataclass
class TrainConfig:
    lr: float = 1e-5
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.01
    batch_size: int = 1  # per worker
    max_steps: int = 1000
    warmup_steps: int = 0
    prompt_dropout: float = 0.1  # classifier-free dropout so CFG works at inference
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    mixed_precision: str = "bf16"  # compute dtype; master weights stay fp32
    # recompute the frozen DiT blocks' activations in backward; None: on above 1 B DiT parameters (5B: needed to
    # fit an 80 GB GPU), off for the small models, where it would only cost time
    activation_checkpointing: bool | None = None


@dataclass
class Video2LoRAConfig:
    """What a trained artifact needs to rebuild itself (saved as config.json next to the weights)."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    # adapted layers: (module name, in_features, out_features), in order; fixed by the backbone
    layers: list[tuple[str, int, int]] = field(default_factory=list)
    latent_channels: int = 16
    backbone: str = "cogvideox"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # fields added later are left out at their defaults: the config.json (and so the checkpoint's identity in
        # row fingerprints) of a model without them stays as it was, and older code still reads it
        if d["hyper"]["reference_features"] == ("latent",):
            del d["hyper"]["reference_features"]
        if d["hyper"]["correlation_radius"] == 2:
            del d["hyper"]["correlation_radius"]
        if not d["hyper"]["motion_stream"]:
            del d["hyper"]["motion_stream"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Video2LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config.json: unknown fields {sorted(unknown)}")
        lora = LoRAConfig(**{**d.get("lora", {})})
        lora.target_modules = tuple(lora.target_modules)
        return cls(
            lora=lora,
            hyper=HyperConfig(**d.get("hyper", {})),
            layers=[(str(n), int(i), int(o)) for n, i, o in d.get("layers", [])],
            latent_channels=int(d.get("latent_channels", 16)),
            backbone=str(d.get("backbone", "cogvideox")),
        )
