"""Cheaper denoising steps with per-sample LoRAs: diffusers' own step caches, regional compilation of the DiT's
blocks, and fused q/k/v projections, chosen by `GenerationConfig` (`step_cache`, `compile_blocks`, `fuse_qkv`).

No cache is written here: each choice is a diffusers 0.42 hook config (`transformer.enable_cache(...)`). Which of
them keep a batch of rows with different LoRAs equal to each row alone is what `tests/test_step_cost.py` checks:

* `pyramid_attention`, `faster`, `taylorseer` decide what to reuse from the step index and the timestep only, so
  every row of a batch is cached the same way it would be alone;
* `magcache` decides from the step index and a per-model table of how much the blocks' output changes from one
  step to the next (its `mag_ratios`). The table is calibrated once per generator and size by diffusers' own
  calibration pass on a fixed bare input (`CALIBRATION_PROMPT`, seed 0), never on the batch's rows, so every row is
  still cached the same way it would be alone, and a batch's videos do not depend on which batch came first;
* `first_block` decides from the whole DiT batch (the mean change of the first block's output over every row), so
  a row's video would depend on its neighbours: with it the generator denoises one row (and its CFG pair) at a
  time (`batch_coupled`), which at full size costs nothing (one 5B video already fills an H200: 4 videos take 4x
  one video's step time, docs/measurements/).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging

import torch

logger = logging.getLogger(__name__)

STEP_CACHES = ("none", "pyramid_attention", "faster", "taylorseer", "first_block", "magcache")
BATCH_COUPLED = {"first_block"}  # caches whose decision reads every row of the DiT batch together
CALIBRATION_PROMPT = "a video"  # magcache's calibration input: fixed, so its table never depends on the rows
# what a GenerationConfig field left unset (None) means for each cache: its setting measured best on the trained
# effects backbone (docs/BENCHMARKS.md item 8; magcache's on the quality item too, docs/measurements/
# step_cost_quality.md). Its keys are the fields that cache reads; the others take UNUSED
CACHE_DEFAULTS = {
    "none": {},
    "pyramid_attention": {"interval": 3, "timesteps": (50, 950)},
    "faster": {"interval": 2, "timesteps": (100, 800)},
    "taylorseer": {"interval": 3, "timesteps": (50, 950)},
    "first_block": {"threshold": 0.4},
    "magcache": {"interval": 4, "timesteps": (100, 800), "threshold": 0.3},
}
UNUSED = {"interval": 2, "timesteps": (0, 1000), "threshold": 1.0}


def parse_timesteps(text: str) -> tuple[int, int]:
    """"LOW,HIGH" (a flag, a Serve YAML string) -> (low, high); ValueError for anything else."""
    low, high = (int(v) for v in text.split(","))
    return low, high


def step_options(config) -> tuple[int, tuple[int, int], float]:
    """(interval, timesteps, threshold) of a GenerationConfig: a field left unset (None) takes its cache's
    measured default (CACHE_DEFAULTS). Raises ValueError naming the field for settings no cache can take."""
    if config.step_cache not in STEP_CACHES:
        raise ValueError(f"step_cache={config.step_cache!r}: choose one of {', '.join(STEP_CACHES)}")
    default = {**UNUSED, **CACHE_DEFAULTS[config.step_cache]}
    interval, timesteps, threshold = (default[k] if v is None else v for k, v in (
        ("interval", config.step_cache_interval), ("timesteps", config.step_cache_timesteps),
        ("threshold", config.step_cache_threshold)))
    try:
        if isinstance(timesteps, str):
            timesteps = parse_timesteps(timesteps)
        if isinstance(interval, bool) or float(interval) != int(float(interval)) or len(timesteps) != 2:
            raise ValueError
        interval, timesteps, threshold = int(float(interval)), (int(timesteps[0]), int(timesteps[1])), float(threshold)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"step_cache_interval={config.step_cache_interval!r}, step_cache_timesteps="
                         f"{config.step_cache_timesteps!r}, step_cache_threshold={config.step_cache_threshold!r}: "
                         "give an integer, a (low, high) pair and a number (or leave them unset)") from None
    check_step_options(config.step_cache, interval, timesteps, threshold)
    return interval, timesteps, threshold


def cache_signature(config) -> dict:
    """The step cache as it changes the videos: its name and only the settings it reads, as plain numbers."""
    interval, timesteps, threshold = step_options(config)
    values = {"interval": interval, "timesteps": list(timesteps), "threshold": threshold}
    return {"cache": config.step_cache, **{k: values[k] for k in CACHE_DEFAULTS[config.step_cache]}}


def resolved(config):
    """`config` (a GenerationConfig) with its step-cache fields filled in as `step_options` reads them."""
    import dataclasses

    interval, timesteps, threshold = step_options(config)
    return dataclasses.replace(config, step_cache_interval=interval, step_cache_timesteps=timesteps,
                               step_cache_threshold=threshold)


def check_step_options(cache: str, interval: int, timesteps, threshold: float) -> None:
    """Raise ValueError naming the GenerationConfig field for settings no cache can take."""
    if cache not in STEP_CACHES:
        raise ValueError(f"step_cache={cache!r}: choose one of {', '.join(STEP_CACHES)}")
    if int(interval) < 2:
        raise ValueError(f"step_cache_interval={interval}: must be at least 2 (1 would reuse nothing)")
    lo, hi = timesteps
    if not 0 <= lo < hi <= 1000:
        raise ValueError(f"step_cache_timesteps={tuple(timesteps)}: need 0 <= low < high <= 1000")
    if not threshold > 0:
        raise ValueError(f"step_cache_threshold={threshold}: must be positive")


def _attention_patterns(backbone) -> list[str]:
    """Regexes (re.fullmatch) naming every block's self-attention: diffusers' default patterns end in `attn`,
    which CogVideoX's and Wan's `attn1` do not fullmatch, so TaylorSeer would hook nothing without these."""
    return [r"transformer_blocks\.\d+\.attn1"] if backbone.kind.startswith("cogvideox") else [r"blocks\.\d+\.attn1"]


def cache_config(backbone, cache: str, interval: int, timesteps, threshold: float, steps: int, cfg: bool = True,
                 mag_ratios=None):
    """The diffusers hook config of one choice (None for "none"). `timesteps`: the window (0-1000 scale) where
    attention outputs may be reused; outside it (the first, noisiest steps and the last ones) every step computes.
    magcache takes `mag_ratios` from `StepCost.calibrate_magcache`; without them it is the calibration pass."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    pipe = backbone.pipe
    window = (int(timesteps[0]), int(timesteps[1]))
    if cache == "none":
        return None
    if cache == "pyramid_attention":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(interval),
                                               spatial_attention_timestep_skip_range=window,
                                               current_timestep_callback=lambda: pipe.current_timestep)
    if cache == "faster":
        # FasterCache reuses attention only on steps where it also skips the unconditional CFG rows (it
        # approximates them from the conditional ones, per row, in frequency space); the DiT then sees only the
        # conditional half, whose rows keep their own LoRAs (LightLoRALinear maps any repeat of the LoRA rows)
        return FasterCacheConfig(spatial_attention_block_skip_range=int(interval),
                                 spatial_attention_timestep_skip_range=window,
                                 unconditional_batch_skip_range=int(interval),
                                 unconditional_batch_timestep_skip_range=window,
                                 current_timestep_callback=lambda: pipe.current_timestep,
                                 attention_weight_callback=lambda _: 0.5, is_guidance_distilled=not cfg,
                                 tensor_format="BFCHW" if backbone.kind.startswith("cogvideox") else "BCFHW")
    if cache == "taylorseer":
        # full steps every `interval`; in between each block's attention output is extrapolated (first order)
        start = max(2, int(round(steps * (1000 - window[1]) / 1000)))
        return TaylorSeerCacheConfig(cache_interval=int(interval), disable_cache_before_step=start,
                                     max_order=1, taylor_factors_dtype=torch.float32,
                                     cache_identifiers=_attention_patterns(backbone))
    if cache == "first_block":
        return FirstBlockCacheConfig(threshold=float(threshold))
    if cache == "magcache":
        # whole steps skipped (every block: the last computed residual is reused) while the accumulated change
        # predicted by the calibrated ratios stays under `threshold`, at most `interval - 1` steps in a row; the
        # first (1000 - high) / 1000 of the steps always compute (a share of the steps, not timesteps: on a shifted
        # schedule such as Wan's these are not exactly the steps above `high`); MagCache has no lower bound
        if mag_ratios is None:
            return MagCacheConfig(calibrate=True, num_inference_steps=int(steps))
        return MagCacheConfig(threshold=float(threshold), max_skip_steps=int(interval) - 1,
                              retention_ratio=(1000 - window[1]) / 1000, num_inference_steps=int(steps),
                              mag_ratios=list(mag_ratios))
    raise ValueError(f"step_cache={cache!r}: choose one of {', '.join(STEP_CACHES)}")


class StepCost:
    """What the generator's backbone currently has enabled; `apply` changes only what differs."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.cache_key: tuple | None = None
        self.compiled = False
        self.fused = False
        self.mag_ratios: dict[tuple, tuple[float, ...]] = {}  # (steps, CFG scale, frames, height, width) -> ratios

    @property
    def transformer(self):
        return self.backbone.transformer

    def apply(self, config, steps: int, guidance_scale: float, size: tuple = (), calibration_run=None) -> None:
        """Enable the cache, fused projections and compilation that `config` (a GenerationConfig) asks for.
        magcache: `calibration_run()` denoises the fixed calibration input at this call's `size` (frames, height,
        width), once per size; its ratios then stay with this generator."""
        interval, timesteps, threshold = step_options(config)
        if config.fuse_qkv and not self.fused:
            if self.compiled:
                raise ValueError("fuse_qkv must be chosen before the blocks are compiled")
            from ..lightlora import fuse_qkv_lightlora

            fused = fuse_qkv_lightlora(self.transformer)
            self.transformer.requires_grad_(False)
            self.fused = True
            logger.info("fused q/k/v projections (%d with LoRAs)", fused)
        elif not config.fuse_qkv and self.fused:
            raise ValueError("fuse_qkv cannot be turned off on a generator that fused its projections; make a new one")
        key = (config.step_cache, interval, timesteps, threshold, int(steps) if config.step_cache in ("taylorseer", "magcache") else 0,
               guidance_scale > 1)  # the pipelines run CFG for a scale above 1
        ratios = None
        if config.step_cache == "magcache":
            at = (int(steps), float(guidance_scale), *size)  # the ratios change with the CFG scale
            if at not in self.mag_ratios:
                self.mag_ratios[at] = self.calibrate_magcache(steps, calibration_run)
            ratios = self.mag_ratios[at]
            key = (*key, ratios)
        if config.step_cache == "none":
            key = None
        if key != self.cache_key:
            if self.cache_key is not None:
                self.transformer.disable_cache()
            hook = cache_config(self.backbone, config.step_cache, interval, timesteps, threshold, steps,
                                guidance_scale > 1, ratios)
            if hook is not None:
                self.transformer.enable_cache(hook)
            self.cache_key = key
        if self.cache_key is not None:  # a call that raised midway leaves state behind: start every call clean
            self.transformer._reset_stateful_cache()
        if config.compile_blocks and not self.compiled:
            compile_blocks(self.transformer)
            self.compiled = True

    def clear_cache(self) -> None:
        """Turn the step cache off (the next `apply` turns it on again): for a forward pass that must not skip."""
        if self.cache_key is not None:
            self.transformer.disable_cache()
            self.cache_key = None

    def calibrate_magcache(self, steps: int, calibration_run) -> tuple[float, ...]:
        """diffusers' MagCache calibration pass (nothing skipped) over `calibration_run()`: the mean ratio of the
        blocks' residual norm at each step to the one before, which diffusers reports through its logger."""
        if calibration_run is None:
            raise ValueError("step_cache='magcache' needs a calibration run (Video2LoRAGenerator.generate gives one)")
        if self.cache_key is not None:
            self.transformer.disable_cache()
            self.cache_key = None
        self.transformer.enable_cache(cache_config(self.backbone, "magcache", 2, (0, 1000), 1.0, steps))
        records: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: records.append(record.getMessage())
        mag_logger = logging.getLogger("diffusers.hooks.mag_cache")
        level, propagate = mag_logger.level, mag_logger.propagate
        mag_logger.setLevel(logging.INFO)
        mag_logger.propagate = False  # ours alone, not diffusers' stderr handler
        mag_logger.addHandler(handler)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # diffusers also prints the table
                calibration_run()
        finally:
            mag_logger.removeHandler(handler)
            mag_logger.setLevel(level)
            mag_logger.propagate = propagate
            self.transformer.disable_cache()
        # one table per cache context: CogVideoX runs CFG as one batch ("cond_uncond"), Wan as two calls ("cond",
        # "uncond"); diffusers' MagCache takes one table for every context, so theirs is averaged step by step
        try:
            tables = [ast.literal_eval(r.split(":", 1)[1].strip()) for r in records
                      if r.startswith("MagCache Calibration Results:")]
        except (ValueError, SyntaxError) as e:  # e.g. a nan ratio: a table no skip decision can use
            raise RuntimeError(f"magcache calibration over {steps} steps gave an unusable table: {e}") from None
        if not tables or any(len(t) != int(steps) for t in tables):
            raise RuntimeError(f"magcache calibration over {steps} steps gave tables of lengths "
                               f"{[len(t) for t in tables]}")
        ratios = tuple(sum(float(t[i]) for t in tables) / len(tables) for i in range(int(steps)))
        logger.info("magcache calibrated over %d steps: %s", steps, ", ".join(f"{r:.3f}" for r in ratios))
        return ratios

    @property
    def batch_coupled(self) -> bool:
        return self.cache_key is not None and self.cache_key[0] in BATCH_COUPLED


def compile_blocks(transformer) -> int:
    """Regional compilation: torch.compile each repeated transformer block (diffusers' `compile_repeated_blocks`
    where the model names them, e.g. Wan; CogVideoX names none, so its `transformer_blocks` one by one). The
    LightLoRA factors are tensors the compiled graph reads, so a new batch's LoRAs reuse the graph; what makes a
    new graph is only a new shape (batch size, frames, size) or a LoRA appearing or going (bare vs adapted)."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(dynamic=False)
        return sum(type(m).__name__ in transformer._repeated_blocks for m in transformer.modules())
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"compile_blocks: {type(transformer).__name__} has neither _repeated_blocks nor transformer_blocks")
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
