"""GPU placement chosen from the cluster when the user gives no counts (the Ray test uses fake GPUs)."""

import pytest

from pipelines.config import BatchJobConfig, with_placement


@pytest.mark.parametrize("gpus, actors", [(0, 1), (1, 1), (2, 2), (4, 4), (8, 8)])
def test_each_generation_actor_gets_a_gpu_and_the_hypernetwork_fits_beside(gpus, actors):
    cfg = with_placement(BatchJobConfig(), gpus)
    assert cfg.num_gen_actors == actors
    if gpus:
        assert cfg.gen_num_gpus > 0.5  # no two generation actors can share a GPU
        assert cfg.hyper_num_gpus + cfg.gen_num_gpus <= 1  # a hypernetwork actor fits beside one of them
        assert cfg.num_gen_actors * cfg.gen_num_gpus + cfg.hyper_num_gpus <= gpus
    else:
        assert cfg.gen_num_gpus == cfg.hyper_num_gpus == 0


def test_explicit_counts_are_kept_and_never_ask_for_more_than_the_cluster():
    cfg = with_placement(BatchJobConfig(num_gen_actors=3, gen_num_gpus=0.5, hyper_num_gpus=0.0), 8)
    assert (cfg.num_gen_actors, cfg.gen_num_gpus, cfg.hyper_num_gpus) == (3, 0.5, 0.0)
    cfg = with_placement(BatchJobConfig(gen_num_gpus=1.0), 4)  # whole GPUs: three, the fourth shares the hypernet
    assert (cfg.num_gen_actors, cfg.hyper_num_gpus) == (3, 0.25)
    cfg = with_placement(BatchJobConfig(gen_num_gpus=1.0), 1)  # no room beside: the hypernetwork on CPU
    assert (cfg.num_gen_actors, cfg.hyper_num_gpus) == (1, 0.0)


def test_batch_job_without_counts_places_one_generation_actor_per_gpu(tiny_backbone_dir, tmp_path):
    """2 (fake) GPUs, no counts given: two generation actors, each on a GPU of its own, and the hypernetwork
    actor beside one of them; the job finishes (asking for more than fits would wait forever)."""
    import os
    import re

    import pandas as pd
    import ray
    from conftest import save_model_for, write_clips

    from pipelines.batch import run_batch_job
    from video2lora.config import GenerationConfig

    os.environ["RAY_AUTH_MODE"] = "disabled"
    clips = write_clips(tmp_path / "clips", 2, seed=3)
    manifest = tmp_path / "m.parquet"
    pd.DataFrame([{"sample_id": f"r{i}", "reference_uri": clips[i % 2], "prompt": "a red circle", "seed": i}
                  for i in range(6)]).to_parquet(manifest)
    cfg = BatchJobConfig(backbone=tiny_backbone_dir, checkpoint=save_model_for(tiny_backbone_dir, str(tmp_path / "c")),
                         output=str(tmp_path / "out"), batch_size=1, actor_num_cpus=0.25, decode_num_cpus=0.25,
                         generation=GenerationConfig(num_frames=9, height=32, width=32, steps=2))
    ray.init(address="local", num_cpus=2, num_gpus=2, log_to_driver=False)
    try:
        assert ray.cluster_resources()["GPU"] == 2
        summary = run_batch_job(str(manifest), cfg, progress=False)
    finally:
        ray.shutdown()
    assert summary["ok"] == 6
    workers = pd.read_parquet(summary["results_uri"]).gen_worker
    gpus_of = {re.search(r"pid=(\d+)", w)[1]: re.search(r"gpus=\[([^\]]*)\]", w)[1] for w in workers}
    assert all(g in ("0", "1") for g in gpus_of.values())  # every generation actor holds one GPU
    assert len(set(gpus_of.values())) == len(gpus_of)  # and no two share one
