"""Single-process generation: references + prompts in, videos out, one LoRA per sample in one batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .backbones import Backbone
from .backbones.step_cost import BATCH_COUPLED, CALIBRATION_PROMPT, StepCost
from .config import GenerationConfig, InputError, LoRAConfig, Video2LoRAConfig
from .hypernet import Video2LoRAModel
from .lightlora import LayerLoRA, inject_lightlora, per_sample_loras
from .export import ExportedLoRA
from .predict import PredictedLoRA, encode_reference_list, predict_loras
from .refine import UNFAMILIAR_ABOVE, reference_fit, refine_lora

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt: str
    reference: torch.Tensor | None = None  # (3, F, H, W) in [-1, 1]; None: no LoRA
    # already predicted (e.g. by the Ray hypernet stage; PredictedLoRA.blend for a mix), or a LoRA file read back
    lora: PredictedLoRA | ExportedLoRA | None = None
    # several references mixed by weight (instead of `reference`): their LoRAs side by side, exactly the weighted
    # sum of their deltas (PredictedLoRA.blend); weights default to 1 / len(references)
    references: list[torch.Tensor] | None = None
    reference_weights: list[float] | None = None
    image: torch.Tensor | None = None  # (3, H, W) first frame for I2V
    negative_prompt: str | None = None
    seed: int | None = None
    lora_strength: float | None = None
    # the reference's caption, for GenerationConfig.refine_steps > 0 (the refinement's prompt; "": the empty one)
    reference_prompt: str = ""


@dataclass
class GenerationTimings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class Video2LoRAGenerator:
    """Holds the frozen backbone (with LightLoRA layers injected once) and the trained hypernetwork."""

    def __init__(self, backbone: Backbone, model: Video2LoRAModel | None, config: GenerationConfig | None = None):
        self.backbone = backbone
        self.model = model
        self.config = config or GenerationConfig()
        self.layer_names: list[str] = []
        if model is not None:
            expected = [tuple(l) for l in model.config.layers]
            actual = backbone.lora_layers(model.config.lora.target_modules)
            if expected != actual:
                raise ValueError(
                    f"checkpoint was trained for {len(expected)} layers {expected[:2]}..., "
                    f"this {backbone.kind} backbone has {len(actual)} {actual[:2]}...: wrong --backbone for this --checkpoint?"
                )
            model.to(backbone.device).eval().requires_grad_(False)
            self.layer_names = inject_lightlora(backbone.transformer, model.config.lora.target_modules)

    @classmethod
    def from_pretrained(cls, backbone_uri: str, checkpoint_uri: str | None, config=None, device=None, dtype=None):
        backbone = Backbone.from_pretrained(backbone_uri, device=device, dtype=dtype)
        model = Video2LoRAModel.from_pretrained(checkpoint_uri) if checkpoint_uri else None
        return cls(backbone, model, config)

    def check_request(self, num_frames: int, height: int, width: int, has_image: bool) -> None:
        """Raise ValueError (a user error, recorded per row) for a request this backbone cannot generate."""
        self.backbone.check_size(num_frames, height, width)
        if self.backbone.is_i2v and not has_image:
            raise InputError("image_uri", "the image-to-video backbone needs image_uri (a first frame) for this row")

    def lora_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of one PredictedLoRA for this checkpoint: A_pred (L, r, down), B_pred (L, up, r)."""
        lc = self.model.config.lora
        return (len(self.layer_names), lc.rank, lc.down), (len(self.layer_names), lc.up, lc.rank)

    def lora_from_bytes(self, a: bytes, b: bytes) -> PredictedLoRA:
        """A PredictedLoRA from PredictedLoRA.to_bytes output, shaped for this checkpoint (any rank: a blend's)."""
        (layers, _, down), (_, up, _) = self.lora_shapes()
        return PredictedLoRA.from_bytes(a, b, (layers, -1, down), (layers, up, -1))

    def lora_from_file(self, data: bytes, name: str) -> ExportedLoRA:
        """A LoRA file (as `export_lora` writes) checked against this generator's adapted layers; ValueError names
        the file and the key that does not fit."""
        dims = {n: (m.in_features, m.out_features) for n, m in self.backbone.transformer.named_modules()
                if n in set(self.layer_names)}
        return ExportedLoRA.from_bytes(data, name, [(n, *dims[n]) for n in self.layer_names])

    def export_lora(self, lora: PredictedLoRA | ExportedLoRA, strength: float) -> bytes:
        """One LoRA as a diffusers/PEFT safetensors file (see video2lora.export)."""
        from .export import export_lora_bytes

        if isinstance(lora, ExportedLoRA):
            return lora.to_bytes(self.layer_names, strength)
        return export_lora_bytes(self.model, lora.a_pred, lora.b_pred, strength)

    @torch.no_grad()
    def release_hypernetwork(self) -> None:
        """Keep only what applies LoRAs (the aux matrices): for a stage that is given LoRAs predicted elsewhere."""
        if self.model is not None:
            self.model.hypernet = None

    def modules(self) -> dict[str, torch.nn.Module]:
        """What this generator keeps resident: the backbone's models and the checkpoint's parts."""
        held = dict(self.backbone.modules())
        if self.model is not None:
            held["aux"] = torch.nn.ModuleList([self.model.a_aux, self.model.b_aux])
            if self.model.hypernet is not None:
                held["hypernetwork"] = self.model.hypernet
        return held

    def predict_loras(self, references: list[torch.Tensor], batch_size: int = 8) -> list[PredictedLoRA]:
        """Reference clips (3, F, H, W) in [-1, 1] -> one PredictedLoRA each (fp32, on CPU)."""
        if self.model is None or self.model.hypernet is None:
            raise ValueError("no hypernetwork loaded: pass checkpoint_uri to predict LoRAs")
        return predict_loras(self.backbone, self.model.hypernet, references, batch_size)

    def refine_loras(self, loras: list[PredictedLoRA], references: list[torch.Tensor],
                     reference_prompts: list[str] | None = None) -> list[PredictedLoRA]:
        """Each predicted LoRA refined on its own reference clip (3, F, H, W) in [-1, 1] and caption (""
        for none) for config.refine_steps steps (video2lora/refine.py); unchanged with refine_steps = 0."""
        if self.config.refine_steps == 0:
            return list(loras)
        bb = self.backbone
        # the hypernetwork stage's encoding of a reference (predict.encode_reference_list), one per VAE call
        latents = encode_reference_list(bb, [ref.to(bb.device, bb.dtype) for ref in references], batch_size=1)
        return self.refine_loras_from_latents(loras, latents, [ref[:, 0] for ref in references], reference_prompts)

    def _refine_inputs(self, latents: list[torch.Tensor], first_frames: list[torch.Tensor | None],
                       prompts: list[str]):
        """Per reference: its latents (1, C, f, h, w), caption embedding and, for an i2v backbone, image latents."""
        bb = self.backbone
        if not len(latents) == len(first_frames) == len(prompts):
            raise ValueError(f"{len(latents)} references, {len(first_frames)} first frames, {len(prompts)} prompts: "
                             "one each")
        for lat, frame, prompt in zip(latents, first_frames, prompts):
            if bb.is_i2v and frame is None:
                raise ValueError("refine: the image-to-video backbone needs each reference's first frame")
            with torch.no_grad():
                lat = lat[None].to(bb.device, bb.dtype)
                embeds = bb.encode_prompts([prompt])
                images = bb.encode_first_frames(frame[None].to(bb.device, bb.dtype), lat.shape[2]) if bb.is_i2v else None
            yield lat, embeds, images

    def _check_refinable(self, loras) -> None:
        if self.model is None:
            raise ValueError("no checkpoint loaded: refining a LoRA or measuring its fit needs the checkpoint's aux "
                             "matrices")
        for lora in loras:
            if not isinstance(lora, PredictedLoRA):
                raise ValueError(f"refine: a {type(lora).__name__} is not a predicted LoRA (A_pred, B_pred)")

    def reference_fits_from_latents(self, loras: list[PredictedLoRA], latents: list[torch.Tensor],
                                    first_frames: list[torch.Tensor | None], reference_prompts: list[str] | None = None
                                    ) -> list[float]:
        """Each LoRA's `refine.reference_fit` on its own reference (latents (C, f, h, w), first frame for an i2v
        backbone, caption): above `refine.UNFAMILIAR_ABOVE` the reference is unfamiliar to the hypernetwork."""
        self._check_refinable(loras)
        if len(loras) != len(latents):
            raise ValueError(f"{len(loras)} LoRAs, {len(latents)} references: one each")
        self.step_cost.clear_cache()  # a step cache would skip blocks of the loss's forward
        prompts = reference_prompts or [""] * len(latents)
        inputs = self._refine_inputs(latents, first_frames, prompts)
        return [reference_fit(self.model, self.backbone, lora, lat, embeds, images, seed=self.config.seed)
                for lora, (lat, embeds, images) in zip(loras, inputs)]

    def refine_steps_for(self, fit: float | None) -> int:
        """The steps a reference of this fit is refined for (GenerationConfig.refine_steps_unfamiliar)."""
        c = self.config
        if c.refine_steps_unfamiliar is None:
            return c.refine_steps
        if fit is None:
            raise ValueError("refine_steps_unfamiliar is set: each reference's fit is needed")
        return c.refine_steps_unfamiliar if fit > UNFAMILIAR_ABOVE else c.refine_steps

    def refine_loras_from_latents(self, loras: list[PredictedLoRA], latents: list[torch.Tensor],
                                  first_frames: list[torch.Tensor | None], reference_prompts: list[str] | None = None,
                                  fits: list[float] | None = None) -> list[PredictedLoRA]:
        """`refine_loras` on references already VAE-encoded (C, f, h, w), as the hypernetwork stage ships them;
        an image-to-video backbone also needs each reference's first frame (3, H, W) in [-1, 1]. With
        config.refine_steps_unfamiliar set, each reference's fit (`fits`, else computed here) picks its steps."""
        c, bb = self.config, self.backbone
        if c.refine_steps == 0:
            return list(loras)
        self._check_refinable(loras)
        prompts = reference_prompts or [""] * len(latents)
        if len(loras) != len(latents) or (fits is not None and len(fits) != len(loras)):
            raise ValueError(f"{len(loras)} LoRAs, {len(latents)} references"
                             f"{'' if fits is None else f', {len(fits)} fits'}: one each")
        if c.refine_steps_unfamiliar is not None and fits is None:
            fits = self.reference_fits_from_latents(loras, latents, first_frames, prompts)
        self.step_cost.clear_cache()  # a step cache would skip blocks of the training forward
        with torch.no_grad():
            empty = bb.encode_prompts([""])
        out = []
        for i, (lat, embeds, images) in enumerate(self._refine_inputs(latents, first_frames, prompts)):
            steps = self.refine_steps_for(None if fits is None else fits[i])
            refined, _ = refine_lora(self.model, bb, loras[i], lat, embeds, empty, images,
                                     steps=steps, lr=c.refine_lr, draws=c.refine_draws, seed=c.seed)
            out.append(refined)
        return out

    def materialize(self, loras: list[PredictedLoRA | ExportedLoRA | None]) -> tuple[list[LayerLoRA], torch.Tensor]:
        """Per-layer LoRAs for a batch; rows without a LoRA get zeros and strength 0. Rows of different ranks (a
        blend, a LoRA file) are padded with zero factors to the largest: a zero rank adds exactly nothing."""
        num_layers = len(self.layer_names)
        lc = self.model.config.lora
        rank = max([lc.rank] + [l.rank for l in loras if l is not None])
        a = torch.zeros(len(loras), num_layers, rank, lc.down)
        b = torch.zeros(len(loras), num_layers, lc.up, rank)
        present = torch.tensor([l is not None for l in loras])
        for i, l in enumerate(loras):
            if isinstance(l, PredictedLoRA):
                a[i, :, : l.rank], b[i, :, :, : l.rank] = l.a_pred, l.b_pred
        dtype = self.backbone.dtype
        with torch.no_grad():
            layers = self.model.materialize(a.to(self.backbone.device), b.to(self.backbone.device))
            for i, l in enumerate(loras):  # a LoRA file's factors are already materialised
                if isinstance(l, ExportedLoRA):
                    for layer, down, up in zip(layers, l.downs, l.ups):
                        layer.down[i] = 0
                        layer.up[i] = 0
                        layer.down[i, : down.shape[0]] = down.to(layer.down)
                        layer.up[i, :, : up.shape[1]] = up.to(layer.up)
        return [LayerLoRA(l.down.to(dtype), l.up.to(dtype)) for l in layers], present

    def adapted_layers(self, patterns=None) -> list[str]:
        """Names of the layers LoRAs apply to, in order: the hypernetwork's; without one, the layers matching
        `patterns` (default: the backbone's lora targets), LightLoRA-wrapped on the first call."""
        if not self.layer_names:
            if self.step_cost.fused:
                raise ValueError("fuse_qkv fused the projections before any LoRA layers were chosen; call "
                                 "adapted_layers() first")
            self.layer_names = inject_lightlora(self.backbone.transformer, patterns or self.backbone.lora_targets)
        return self.layer_names

    @property
    def step_cost(self) -> StepCost:
        """The step cache / compiled blocks / fused projections the backbone runs with (GenerationConfig)."""
        if getattr(self, "_step_cost", None) is None:
            self._step_cost = StepCost(self.backbone)
        return self._step_cost

    def generate(self, requests: list[GenerationRequest], num_frames=None, height=None, width=None,
                 steps=None, guidance_scale=None, timings: GenerationTimings | None = None,
                 layer_loras: list[LayerLoRA] | None = None) -> list[torch.Tensor]:
        """Generate one video per request, all in one batch. Returns (3, F, H, W) tensors in [-1, 1].

        `layer_loras`: already-materialised LoRAs instead of predicted ones (e.g. ordinary trained LoRAs), one
        `LayerLoRA` per `adapted_layers()` layer with one row per request, applied at each request's lora_strength;
        the requests then carry no reference or lora."""
        if layer_loras is not None and any(r.lora is not None or r.reference is not None or r.references
                                           for r in requests):
            raise ValueError("pass either layer_loras or per-request references / LoRAs, not both")
        c = self.config
        if c.step_cache in BATCH_COUPLED and len(requests) > 1:  # its skip decision would mix the rows: one at a time
            return [v for i, r in enumerate(requests) for v in self.generate(
                [r], num_frames, height, width, steps, guidance_scale, timings,
                None if layer_loras is None else [LayerLoRA(l.down[i: i + 1], l.up[i: i + 1]) for l in layer_loras])]
        num_frames, height, width = num_frames or c.num_frames, height or c.height, width or c.width
        steps = steps or c.steps
        guidance_scale = c.guidance_scale if guidance_scale is None else guidance_scale
        self.backbone.check_size(num_frames, height, width)
        timings = timings or GenerationTimings()
        tiling = c.vae_tiling if c.vae_tiling is not None else max(height, width) > 256
        self.backbone.enable_vae_tiling(tiling)

        if c.refine_steps and any(r.references for r in requests):
            raise InputError("reference_uris", "reference_uris: refine_steps > 0 refines the LoRA of one "
                             "reference; a mix of several is not refined: give one reference, or refine_steps 0")
        start = time.perf_counter()
        missing = [i for i, r in enumerate(requests) if r.lora is None and r.reference is not None]
        if missing:
            predicted = self.predict_loras([requests[i].reference for i in missing])
            for i, p in zip(missing, predicted):
                requests[i].lora = p
        for r in requests:  # mixes: each reference's LoRA, then side by side
            if r.lora is None and r.references:
                weights = r.reference_weights or [1.0 / len(r.references)] * len(r.references)
                r.lora = PredictedLoRA.blend(self.predict_loras(list(r.references)), list(weights))
        timings.add("hypernet", time.perf_counter() - start)
        loras = [r.lora for r in requests]  # refined here, the requests keep their predictions
        todo = [i for i, r in enumerate(requests) if r.reference is not None and isinstance(r.lora, PredictedLoRA)]
        if c.refine_steps and todo:
            start = time.perf_counter()
            refined = self.refine_loras([loras[i] for i in todo], [requests[i].reference for i in todo],
                                        [requests[i].reference_prompt for i in todo])
            for i, lora in zip(todo, refined):
                loras[i] = lora
            timings.add("refine", time.perf_counter() - start)

        generators = [torch.Generator("cpu").manual_seed(c.seed if r.seed is None else int(r.seed)) for r in requests]
        prompts = [r.prompt for r in requests]
        negatives = [c.negative_prompt if r.negative_prompt is None else r.negative_prompt for r in requests]
        images = torch.stack([r.image for r in requests]) if self.backbone.is_i2v else None

        start = time.perf_counter()
        layers = None
        if layer_loras is not None:
            self.adapted_layers()
        self.step_cost.apply(c, steps, guidance_scale, (num_frames, height, width),
                             lambda: self.calibration_run(num_frames, height, width, steps, guidance_scale))
        if layer_loras is not None:
            device, dtype = self.backbone.device, self.backbone.dtype
            layers = [LayerLoRA(l.down.to(device, dtype), l.up.to(device, dtype)) for l in layer_loras]
            present = torch.ones(len(requests), dtype=torch.bool)
        elif self.model is not None and any(lora is not None for lora in loras):
            layers, present = self.materialize(loras)
        if layers is not None:
            strengths = torch.tensor([c.lora_strength if r.lora_strength is None else r.lora_strength for r in requests])
            strengths = torch.where(present, strengths, torch.zeros_like(strengths))
            with per_sample_loras(self.backbone.transformer, self.layer_names, layers, strengths):
                latents = self.backbone.sample_latents(prompts, negatives, generators, num_frames, height, width, steps, guidance_scale, images)
        else:
            latents = self.backbone.sample_latents(prompts, negatives, generators, num_frames, height, width, steps, guidance_scale, images)
        timings.add("denoise", time.perf_counter() - start)

        start = time.perf_counter()
        videos = self.backbone.decode(latents).cpu()
        timings.add("decode", time.perf_counter() - start)
        return list(videos)

    def warm_up(self) -> bool:
        """Do now what a step cache measures once per generator (magcache's calibration: one bare video), at the
        configured frames, size, steps and CFG scale, so that the first request does not pay for it. Returns
        whether it calibrated; rows of another size or step count still calibrate on their first call."""
        c = self.config
        if c.step_cache != "magcache":
            return False
        try:
            self.backbone.check_size(c.num_frames, c.height, c.width)
        except ValueError as e:  # rows may all bring their own sizes: theirs calibrate when they come
            logger.warning("no step-cache warm-up at the configured size: %s", e)
            return False
        before = len(self.step_cost.mag_ratios)
        self.step_cost.apply(c, c.steps, c.guidance_scale, (c.num_frames, c.height, c.width),
                             lambda: self.calibration_run(c.num_frames, c.height, c.width, c.steps, c.guidance_scale))
        return len(self.step_cost.mag_ratios) > before

    def calibration_run(self, num_frames, height, width, steps, guidance_scale) -> None:
        """The bare backbone on a fixed input (a step cache's calibration): the same every time, whatever the rows."""
        image = torch.zeros(1, 3, height, width) if self.backbone.is_i2v else None
        generator = torch.Generator("cpu").manual_seed(0)
        self.backbone.sample_latents([CALIBRATION_PROMPT], [self.config.negative_prompt], [generator], num_frames,
                                     height, width, steps, guidance_scale, image)


def new_model_for(backbone: Backbone, config: Video2LoRAConfig | None = None, seed: int = 0) -> Video2LoRAModel:
    """A fresh (untrained) Video2LoRA model whose layers match this backbone."""
    config = config or Video2LoRAConfig()
    if tuple(config.lora.target_modules) == LoRAConfig().target_modules:
        config.lora.target_modules = tuple(backbone.lora_targets)
    config.layers = backbone.lora_layers(config.lora.target_modules)
    config.latent_channels = backbone.latent_channels
    config.backbone = backbone.kind
    torch.manual_seed(seed)
    return Video2LoRAModel(config)
