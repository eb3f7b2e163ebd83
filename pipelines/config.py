"""Settings of the Ray jobs (actor counts, GPUs, row defaults); the model library's settings are video2lora.config."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from video2lora.backbones.step_cost import parse_timesteps
from video2lora.config import GenerationConfig


@dataclass
class BatchJobConfig:
    """The batch generation job (`jobs/batch_generate.py`): stages, resources, defaults for rows."""

    backbone: str = ""  # diffusers pipeline dir (local or s3://); "" = the embedded tiny default
    checkpoint: str = ""  # trained Video2LoRA artifact dir; "" = the embedded default
    output: str = "outputs/batch"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 4  # rows per generation call; every row has its own LoRA
    hyper_batch_size: int = 8  # references per hypernetwork call
    num_hyper_actors: int = 1
    # None: chosen from the cluster when the job starts (`with_placement`): on a cluster with GPUs each generation
    # actor holds one GPU and the hypernetwork stage a quarter of one; on a CPU cluster, one generation actor
    num_gen_actors: int | None = None
    hyper_num_gpus: float | None = None
    gen_num_gpus: float | None = None
    actor_num_cpus: float = 0.5  # fractional on small machines, or actors wait forever
    decode_num_cpus: float = 0.25
    # torch intra-op threads in each hypernetwork / generation actor; 0: leave torch's default, which inside a Ray
    # actor follows OMP_NUM_THREADS = the actor's whole CPUs (at least 1), so 1 thread for actor_num_cpus=0.5
    torch_threads: int = 0
    max_failures: float = -1  # < 0: no limit; >= 1: a count; in (0, 1): a fraction of the rows
    export_loras: bool = False
    redo_changed: bool = False  # remake rows made earlier from other inputs or settings (else the job refuses)
    max_reference_bytes: int = 1 << 30
    results_flush_seconds: float = 10.0


HYPER_GPU_SHARE = 0.25  # the hypernetwork stage holds a VAE encoder and a 1.6 M hypernetwork: a quarter of a GPU
GEN_GPU_SHARE = 1 - HYPER_GPU_SHARE  # no two generation actors fit on one GPU; one hypernetwork actor fits beside


def with_placement(cfg: BatchJobConfig, cluster_gpus: float) -> BatchJobConfig:
    """The config with every unset actor count and GPU share chosen for a cluster of `cluster_gpus` GPUs:
    one generation actor per GPU, each on a GPU of its own (0.75 of it in Ray's accounting, so that a
    hypernetwork actor's 0.25 fits beside it); on a CPU cluster one generation actor. Explicit values are kept.
    An autoscaling cluster may show no GPU before it scales up: pass the counts there (the rendered RayJob does)."""
    gpus = math.floor(cluster_gpus)
    if gpus < 1:
        return dataclasses.replace(cfg, hyper_num_gpus=cfg.hyper_num_gpus or 0.0, gen_num_gpus=cfg.gen_num_gpus or 0.0,
                                   num_gen_actors=cfg.num_gen_actors or 1)
    hyper = HYPER_GPU_SHARE if cfg.hyper_num_gpus is None else cfg.hyper_num_gpus
    gen = GEN_GPU_SHARE if cfg.gen_num_gpus is None else cfg.gen_num_gpus
    actors = cfg.num_gen_actors
    if actors is None:  # as many as fit beside the hypernetwork actors, one per GPU at most
        fit = math.floor((cluster_gpus - hyper * cfg.num_hyper_actors) / gen + 1e-9) if gen > 0 else 1
        actors = max(1, min(gpus, fit))
    if cfg.hyper_num_gpus is None and actors * gen + hyper * cfg.num_hyper_actors > cluster_gpus + 1e-9:
        hyper = 0.0  # the generation actors asked for every GPU: the hypernetwork stage runs on CPU
    return dataclasses.replace(cfg, hyper_num_gpus=hyper, gen_num_gpus=gen, num_gen_actors=actors)


# ---- the step-cost flags of the jobs (jobs/batch_generate.py, jobs/evaluate.py): GenerationConfig's fields
def add_step_cost_args(p, cache_default: str | None = None) -> None:
    """`--step-cache`, `--step-cache-interval`, `--step-cache-threshold`, `--step-cache-timesteps`,
    `--compile-blocks on|off`, `--fuse-qkv on|off`; unset flags keep GenerationConfig's defaults (the step cache:
    `cache_default` where the caller sets another, e.g. the evaluation's exact sampler)."""
    from video2lora.backbones.step_cost import CACHE_DEFAULTS, STEP_CACHES

    g = GenerationConfig()

    def measured(field):
        return ", ".join(f"{c} {d[field] if field != 'timesteps' else ','.join(map(str, d[field]))}"
                         for c, d in CACHE_DEFAULTS.items() if field in d)

    p.add_argument("--step-cache", default=None, choices=STEP_CACHES, help=f"diffusers step cache (default: {cache_default or g.step_cache})")
    p.add_argument("--step-cache-interval", type=_auto(int), default=None,
                   help=f"compute every Nth step (pyramid_attention, faster, taylorseer; magcache: at least every "
                        f"Nth; default, or auto: the cache's measured setting, {measured('interval')})")
    p.add_argument("--step-cache-threshold", type=_auto(float), default=None,
                   help=f"first_block: reuse while the first block changes less than this; magcache: while the "
                        f"accumulated calibrated change stays under this (default, or auto: {measured('threshold')})")
    p.add_argument("--step-cache-timesteps", default=None, metavar="LOW,HIGH",
                   help=f"timestep window (0-1000) where outputs may be reused (default, or auto: {measured('timesteps')})")
    p.add_argument("--compile-blocks", default=None, choices=("on", "off"), help="torch.compile each DiT block")
    p.add_argument("--fuse-qkv", default=None, choices=("on", "off"), help="fused q/k/v projections with the LoRAs")


def add_refine_args(p) -> None:
    """`--refine-steps`, `--refine-lr`, `--refine-draws`: GenerationConfig's refinement of each predicted LoRA on
    its own reference (video2lora/refine.py); the manifest's `reference_prompt` column is its caption."""
    g = GenerationConfig()
    p.add_argument("--refine-steps", type=int, default=g.refine_steps,
                   help="refine each predicted LoRA on its reference for this many Adam steps of the diffusion loss "
                        f"before generating; one reference per row (default {g.refine_steps}: zero-shot)")
    p.add_argument("--refine-lr", type=float, default=g.refine_lr, help=f"refinement learning rate (default {g.refine_lr})")
    p.add_argument("--refine-draws", type=int, default=g.refine_draws,
                   help=f"noised copies of the reference per refinement step (default {g.refine_draws})")
    p.add_argument("--refine-steps-unfamiliar", type=_steps_or_off, default=None, metavar="N|off",
                   help="refine instead for N steps the references whose predicted LoRA fits them worse than no LoRA "
                        "(a kind of effect the hypernetwork likely never saw; README) (default off: --refine-steps)")
    p.add_argument("--measure-reference-fit", action="store_true",
                   help="record each reference's fit (reference_fit: its own diffusion loss with its predicted LoRA "
                        "over the bare backbone's; above 1, a kind of effect the hypernetwork likely never saw) "
                        "without refining; 16 DiT forward passes per reference")


def _steps_or_off(value: str) -> int | None:
    if value.strip().lower() in ("off", "none", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of steps, or off") from None


def refine_overrides(a) -> dict:
    return {"refine_steps": a.refine_steps, "refine_lr": a.refine_lr, "refine_draws": a.refine_draws,
            "refine_steps_unfamiliar": a.refine_steps_unfamiliar, "measure_reference_fit": a.measure_reference_fit}


def _auto(kind):
    """An argparse type: a number, or `auto` for the chosen cache's measured setting (None)."""
    def parse(text: str):
        return None if text.strip().lower() == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def step_cost_overrides(a) -> dict:
    """The GenerationConfig fields the step-cost flags set (only those given)."""
    out = {}
    for name in ("step_cache", "step_cache_interval", "step_cache_threshold"):
        if getattr(a, name, None) is not None:
            out[name] = getattr(a, name)
    if getattr(a, "step_cache_timesteps", None) and a.step_cache_timesteps.strip().lower() != "auto":
        try:
            out["step_cache_timesteps"] = parse_timesteps(a.step_cache_timesteps)
        except ValueError:
            raise ValueError(f"--step-cache-timesteps={a.step_cache_timesteps!r}: give LOW,HIGH, e.g. 100,800") from None
    for name in ("compile_blocks", "fuse_qkv"):
        if getattr(a, name, None) is not None:
            out[name] = getattr(a, name) == "on"
    return out


def _typed(default, value):
    """A setting from YAML or the command line as the type of its default (on/off for switches, lists as tuples)."""
    if isinstance(default, bool) and isinstance(value, str):
        if value.lower() not in ("on", "off", "true", "false", "1", "0"):
            raise ValueError(f"{value!r}: expected on or off")
        return value.lower() in ("on", "true", "1")
    if isinstance(value, list):
        return tuple(value)
    if default is None and isinstance(value, str) and value.strip().lower() == "auto":
        return None  # an optional setting (e.g. step_cache_threshold): the measured default of what it belongs to
    return value


@dataclass
class ServeConfig:
    """The online app (`pipelines.serve:app`, `jobs/serve.py`): replicas, GPUs, batching, request limits. The
    generation settings and the per-row checks are the batch job's (`generation` are the defaults of a request)."""

    backbone: str = ""  # diffusers pipeline dir (local or s3://); "" = the embedded tiny default
    checkpoint: str = ""  # trained Video2LoRA artifact dir; "" = the embedded default
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # generator deployment (text encoder + DiT + VAE): concurrent requests denoised together, each with its LoRA
    batch_size: int = 4  # most requests in one denoising batch
    batch_wait_timeout_s: float = 0.1  # how long a batch waits to fill once its first request arrived
    generator_replicas: int = 1  # the minimum (and the count, without autoscaling)
    generator_max_replicas: int = 1  # above generator_replicas: autoscale on queued + ongoing requests per replica
    generator_num_gpus: float | None = None  # None: 1 when the cluster shows a GPU, else 0
    # LoRA predictor deployment (VAE encoder + hypernetwork, a LoRA cache by reference content hash)
    predictor_replicas: int = 1
    predictor_num_gpus: float | None = None  # None: a quarter of a GPU when the cluster shows one, else 0
    replica_num_cpus: float = 0.25  # per replica; fractional on small machines
    torch_threads: int = 0  # per model replica; 0: Ray's default (the replica's whole CPUs, at least 1)
    max_queued_requests: int = 64  # per generator (and predictor) replica, beyond its batch: more waiting answers 503
    max_request_bytes: int = 64 << 20  # a whole upload (reference + first frame); larger is refused before it is read
    # reference_uri may only name these prefixes (the server's own credentials read them); a local directory may be
    # added for a single-machine deployment
    reference_uri_prefixes: tuple[str, ...] = ("s3://", "gs://", "gcs://", "az://", "abfs://")
    request_timeout_s: float = 1800.0  # one request, queue included: past it the client gets a 504, never a hang

    def __post_init__(self):
        if self.generation.refine_steps:  # the predictor deployment does not pass references on to the generator
            raise ValueError("generation.refine_steps: the online app serves the hypernetwork's LoRAs as predicted; "
                             "refine in the batch job (jobs/batch_generate.py --refine-steps)")
        if self.generation.measures_fit:
            raise ValueError("generation.measure_reference_fit: the online app does not pass references on to the "
                             "generator; measure fits in the batch job (jobs/batch_generate.py --measure-reference-fit)")

    def job_config(self) -> BatchJobConfig:
        """The batch job's settings the shared stages read (pipelines/stages.py)."""
        return BatchJobConfig(backbone=self.backbone, checkpoint=self.checkpoint, generation=self.generation,
                              batch_size=self.batch_size, hyper_batch_size=self.batch_size,
                              torch_threads=self.torch_threads, max_reference_bytes=self.max_request_bytes)

    @classmethod
    def from_args(cls, args: dict | None) -> "ServeConfig":
        """From a Serve application's `args` (a RayService's serveConfigV2, `serve run ... key=value`): keys are
        this class's fields, `generation` a mapping of GenerationConfig fields. An unknown key is an error."""
        args = dict(args or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise ValueError(f"unknown serve setting(s) {unknown}; known: {sorted(names)}")
        gen = args.pop("generation", None) or {}
        if isinstance(gen, GenerationConfig):
            generation = gen
        else:
            known = {f.name for f in dataclasses.fields(GenerationConfig)}
            bad = sorted(set(gen) - known)
            if bad:
                raise ValueError(f"unknown generation setting(s) {bad}; known: {sorted(known)}")
            generation = GenerationConfig(**{k: _typed(getattr(GenerationConfig, k, None), v) for k, v in gen.items()})
        out = {}
        for k, v in args.items():
            default = names[k].default
            if isinstance(default, tuple) and isinstance(v, (list, str)):
                v = tuple([v] if isinstance(v, str) else v)
            elif default is None and v is not None:  # a GPU share
                v = float(v)
            elif isinstance(default, (bool, str)):
                pass
            elif isinstance(default, int) and isinstance(v, str):
                v = int(v)
            elif isinstance(default, float) and isinstance(v, (str, int)):
                v = float(v)
            out[k] = v
        cfg = cls(generation=generation, **out)
        if cfg.generator_max_replicas < cfg.generator_replicas:
            cfg.generator_max_replicas = cfg.generator_replicas
        if cfg.batch_size < 1 or cfg.batch_wait_timeout_s < 0 or cfg.max_queued_requests < 1:
            raise ValueError("batch_size and max_queued_requests must be at least 1, batch_wait_timeout_s not negative")
        return cfg
