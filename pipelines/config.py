"""Settings of the Ray jobs (actor counts, GPUs, row defaults); the model library's settings are video2lora.config."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    num_gen_actors: int = 1
    hyper_num_gpus: float = 0.0
    gen_num_gpus: float = 0.0  # 1 on a GPU cluster: each generation actor holds one GPU
    actor_num_cpus: float = 0.5  # fractional on small machines, or actors wait forever
    decode_num_cpus: float = 0.25
    # torch intra-op threads in each hypernetwork / generation actor; 0: leave torch's default, which inside a Ray
    # actor follows OMP_NUM_THREADS = the actor's whole CPUs (at least 1), so 1 thread for actor_num_cpus=0.5
    torch_threads: int = 0
    max_failures: float = -1  # < 0: no limit; >= 1: a count; in (0, 1): a fraction of the rows
    export_loras: bool = False
    max_reference_bytes: int = 1 << 30
    results_flush_seconds: float = 10.0
