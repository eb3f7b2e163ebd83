"""The batch job on Ray Data, end to end on the tiny models (one local Ray instance for the module)."""

import dataclasses
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_model_for, write_clips

from pipelines.batch import TooManyFailures, apply_backbone_defaults, run_batch_job
from pipelines.manifest import ManifestError, read_manifest
from pipelines.config import BatchJobConfig
from video2lora.config import GenerationConfig
from video2lora.video_io import decode_video, encode_video, read_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=6.0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()


@pytest.fixture(scope="module")
def ray_local(s3_server):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    ray.init(address="local", num_cpus=2, num_gpus=2, log_to_driver=False, runtime_env={"env_vars": env},  # fake GPUs
             _metrics_export_port=METRICS_PORT, _system_config={"metrics_report_interval_ms": 500})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tiny_backbone_dir, tmp_path_factory):
    return save_model_for(tiny_backbone_dir, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    paths = write_clips(d, 3, seed=11)
    (d / "corrupt.mp4").write_bytes(b"this is not a video" * 50)
    return d, paths


def config(tiny_backbone_dir, checkpoint, output, **kw):
    cfg = BatchJobConfig(backbone=tiny_backbone_dir, checkpoint=checkpoint, output=str(output),
                         generation=kw.pop("generation", GenerationConfig(**GEN)), batch_size=4, actor_num_cpus=0.25, decode_num_cpus=0.25, **kw)
    return cfg


def write_manifest(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes its columns from row 0 only
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)  # keeps None (default) apart from NaN (an error)
    return str(path)


def results_of(output):
    df = pd.read_parquet(os.path.join(output, "results.parquet"))
    return df.set_index("sample_id")


def test_good_and_bad_rows(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path):
    d, refs = clips
    rows = [
        {"sample_id": "ok_a", "reference_uri": refs[0], "prompt": "a red circle", "seed": 1},
        {"sample_id": "ok_b", "reference_uri": refs[1], "prompt": "a blue square", "seed": 2, "lora_strength": 0.5},
        {"sample_id": "dup_ref", "reference_uri": refs[0], "prompt": "a green ring", "seed": 3},
        {"sample_id": "corrupt", "reference_uri": str(d / "corrupt.mp4"), "prompt": "x", "seed": 4},
        {"sample_id": "missing", "reference_uri": str(d / "nope.mp4"), "prompt": "x", "seed": 5},
        {"sample_id": "no_prompt", "reference_uri": refs[2], "prompt": None, "seed": 6},
        {"sample_id": "bad_size", "reference_uri": refs[2], "prompt": "x", "seed": 7, "num_frames": 10},
        {"sample_id": "nan_scale", "reference_uri": refs[2], "prompt": "x", "seed": 8, "guidance_scale": float("nan")},
        {"sample_id": "../../etc/x", "reference_uri": refs[2], "prompt": "x", "seed": 9},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    summary = run_batch_job(manifest, config(tiny_backbone_dir, checkpoint, out, gen_num_gpus=1, export_loras=True),
                            progress=False)
    res = results_of(str(out))
    assert summary["ok"] == 3 and summary["failed"] == 6
    assert set(res.index[res.status == "ok"]) == {"ok_a", "ok_b", "dup_ref"}
    assert "corrupt.mp4" in res.loc["corrupt", "error"]
    assert "nope.mp4" in res.loc["missing", "error"]
    assert "prompt is not text" in res.loc["no_prompt", "error"]
    assert "num_frames" in res.loc["bad_size", "error"]
    assert "guidance_scale" in res.loc["nan_scale", "error"]
    assert "unsafe name" in res.loc["../../etc/x", "error"]
    # the duplicate reference was encoded once
    assert res.loc["ok_a", "reference_hash"] == res.loc["dup_ref", "reference_hash"]
    assert res.loc[["ok_a", "dup_ref"], "lora_cache_hit"].sum() == 1
    # each generation actor held one (fake) GPU, as configured
    assert all("gpus=[" in w and "gpus=[]" not in w for w in res.loc[res.status == "ok", "gen_worker"])
    videos = sorted(os.listdir(out / "videos"))
    assert videos == ["dup_ref.mp4", "ok_a.mp4", "ok_b.mp4"]
    assert sorted(os.listdir(out / "loras")) == ["dup_ref.safetensors", "ok_a.safetensors", "ok_b.safetensors"]
    assert not [p for p in (tmp_path).rglob("*") if ".tmp" in p.name]  # no partial files
    for c in ("t_fetch_s", "t_hypernet_s", "t_generate_s", "t_write_s"):
        assert (res.loc[res.status == "ok", c] > 0).all()


def test_batch_equals_single_process_per_row(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path):
    from video2lora.generate import GenerationRequest, Video2LoRAGenerator

    _, refs = clips
    prompts = ["a red circle", "a blue square", "a green ring", "a yellow star"]
    rows = [{"sample_id": f"r{i}", "reference_uri": refs[i % 3], "prompt": p, "seed": 10 + i,
             "lora_strength": 1.0 if i != 3 else 0.0} for i, p in enumerate(prompts)]
    out = tmp_path / "out"
    run_batch_job(write_manifest(tmp_path / "m.parquet", rows), config(tiny_backbone_dir, checkpoint, out), progress=False)
    gen = Video2LoRAGenerator.from_pretrained(tiny_backbone_dir, checkpoint, GenerationConfig(**GEN), device="cpu")
    diffs = {}

    def through_codec(video):  # H.264 is lossy: put the reference output through the same encoder
        return decode_video(encode_video(video), "single", 9, 32, 32)

    for r in rows:
        ref = read_video(r["reference_uri"], 9, 32, 32)
        ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # the pipeline ships references between stages as uint8
        alone = gen.generate([GenerationRequest(r["prompt"], reference=ref, seed=r["seed"], lora_strength=r["lora_strength"])])[0]
        made = read_video(str(out / "videos" / f"{r['sample_id']}.mp4"), 9, 32, 32)
        diffs[r["sample_id"]] = float((made - through_codec(alone)).abs().mean())
    bare = gen.generate([GenerationRequest(prompts[0], seed=10)])[0]
    made0 = read_video(str(out / "videos" / "r0.mp4"), 9, 32, 32)
    lora_effect = float((made0 - through_codec(bare)).abs().mean())
    print(diffs, lora_effect)
    # H.264 amplifies float noise between a batch and a single call; the LoRA's effect is far larger than that
    assert max(diffs.values()) < 0.04, diffs
    assert lora_effect > 3 * max(diffs.values()), (lora_effect, diffs)


def test_refining_job_refines_each_reference_once(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path, caplog):
    """--refine-steps: the generation stage refines each row's LoRA on its reference and caption, once per distinct
    pair; its video is the library's refined one. Turned on for a resume, it keeps the rows it would not refine
    (strength 0, a mix made earlier) and refuses a new mix before any work, naming the column."""
    from video2lora.generate import GenerationRequest, Video2LoRAGenerator

    _, refs = clips
    earlier = [{"sample_id": "bare", "reference_uri": refs[1], "prompt": "a green ring", "seed": 3, "lora_strength": 0.0},
               {"sample_id": "mix", "reference_uris": [refs[0], refs[1]], "prompt": "x", "seed": 4}]
    rows = earlier + [
        {"sample_id": "a", "reference_uri": refs[0], "reference_prompt": "a red circle", "prompt": "a blue square", "seed": 1},
        {"sample_id": "b", "reference_uri": refs[0], "reference_prompt": "a red circle", "prompt": "a green ring", "seed": 2},
        {"sample_id": "new_mix", "reference_uris": [refs[0]], "reference_weights": [0.5], "prompt": "x", "seed": 5},
        {"sample_id": "new_bare", "reference_uri": refs[2], "prompt": "x", "seed": 6, "lora_strength": 0.0}]
    plain = GenerationConfig(**GEN, step_cache="none")
    generation = dataclasses.replace(plain, refine_steps=4, refine_lr=1e-2, measure_reference_fit=True)
    out = tmp_path / "out"
    run_batch_job(write_manifest(tmp_path / "m0.parquet", earlier), config(tiny_backbone_dir, checkpoint, out,
                  generation=plain), progress=False)
    summary = run_batch_job(write_manifest(tmp_path / "m.parquet", rows),
                            config(tiny_backbone_dir, checkpoint, out, generation=generation, export_loras=True),
                            progress=False)
    res = results_of(str(out))
    assert summary["ok"] == 3 and summary["skipped"] == 2 and summary["failed"] == 1, summary
    assert res.loc["new_bare", "t_refine_s"] == 0  # strength 0: no LoRA applied, none refined
    assert set(res.index[res.status == "skipped"]) == {"bare", "mix"}  # kept: refinement would not change them
    assert "refine_steps" in res.loc["new_mix", "error"] and "reference_uris" in res.loc["new_mix", "error"]
    assert (res.loc[["a", "b"], "t_refine_s"] > 0).sum() == 1  # one refinement for the two rows
    # --measure-reference-fit: the refined rows' fit, once per reference; none where no reference is read
    assert np.isfinite(res.loc["a", "reference_fit"]) and res.loc["a", "reference_fit"] == res.loc["b", "reference_fit"]
    assert np.isnan(res.loc["new_bare", "reference_fit"])
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))  # noqa: E731
    records = {p.stem: strict(p.read_text()) for p in (out / "rows").iterdir()}
    assert records["a"]["reference_fit"] == res.loc["a", "reference_fit"] and records["new_bare"]["reference_fit"] is None
    assert "2 row(s) made in an earlier run are skipped and get no reference_fit" in caplog.text  # bare, mix
    ref = read_video(refs[0], 9, 32, 32)
    ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # the pipeline ships references between stages as uint8
    gen = Video2LoRAGenerator.from_pretrained(tiny_backbone_dir, checkpoint, generation, device="cpu")
    request = GenerationRequest("a blue square", reference=ref, reference_prompt="a red circle", seed=1)
    refined = gen.generate([request])[0]
    # the row's LoRA file is the refined LoRA (weight level), not the prediction
    exported = gen.lora_from_file((out / "loras" / "a.safetensors").read_bytes(), "a")
    expected = gen.refine_loras([request.lora], [ref], ["a red circle"])[0]
    expected = gen.lora_from_file(gen.export_lora(expected, 1.0), "expected")
    predicted = gen.lora_from_file(gen.export_lora(request.lora, 1.0), "predicted")
    fit = gen.reference_fits_from_latents([request.lora], [gen.backbone.encode_video(ref[None])[0]], [ref[:, 0]],
                                          ["a red circle"])[0]
    assert res.loc["a", "reference_fit"] == pytest.approx(fit, rel=1e-3)  # float noise of the batched prediction
    for got, want, before in zip(exported.ups, expected.ups, predicted.ups):  # float noise of the batched
        assert (got - want).abs().max() < 0.1 * (want - before).abs().max()   # prediction, through 4 Adam steps
    unrefined = Video2LoRAGenerator(gen.backbone, gen.model, plain).generate(
        [GenerationRequest("a blue square", reference=ref, seed=1)])[0]
    made = read_video(str(out / "videos" / "a.mp4"), 9, 32, 32)
    codec = lambda v: decode_video(encode_video(v), "single", 9, 32, 32)  # noqa: E731 - H.264 is lossy
    error, refinement = float((made - codec(refined)).abs().mean()), float((codec(unrefined) - codec(refined)).abs().mean())
    assert refinement > 4 * error, (error, refinement)  # the refined video, not the prediction's


def test_refining_stages_ship_the_reference_latents_once_encoded(ray_local, tiny_i2v_backbone_dir, clips, tmp_path):
    """Refining, the hypernetwork stage encodes each reference once and ships its latents (and an image-to-video
    backbone's first frame), not its pixels; the generation stage refines on them into the library's refined LoRA.
    A reference whose LoRA is already cached is still shipped encoded, for the rows that refine it."""
    from pipelines.stages import GenerateStage, HypernetStage, fetch_and_decode
    from video2lora.generate import Video2LoRAGenerator

    _, refs = clips
    ckpt = save_model_for(tiny_i2v_backbone_dir, str(tmp_path / "ckpt"))
    generation = GenerationConfig(**GEN, step_cache="none", refine_steps=3, refine_lr=1e-2)
    cfg = config(tiny_i2v_backbone_dir, ckpt, tmp_path / "out", generation=generation, hyper_batch_size=1)
    rows = [dict(GEN, sample_id=f"s{i}", reference_uris=[refs[i]], reference_weights=[1.0], reference_prompt=caption,
                 prompt="a cat", negative_prompt="", seed=i, lora_strength=1.0, lora_uri="", image_uri="")
            for i, caption in enumerate(["a red circle", "a blue square"])]  # rows as the job plans them
    hyper, gen = HypernetStage(tiny_i2v_backbone_dir, ckpt, cfg), GenerateStage(tiny_i2v_backbone_dir, ckpt, cfg)
    fetched = fetch_and_decode(pd.DataFrame(rows), cfg)
    hyper(fetched.iloc[:1])  # the first reference's LoRA is cached before the batch that refines it
    shipped = hyper(fetched).to_dict("records")
    assert [r["lora_cache_hit"] for r in shipped] == [True, False]
    assert not {"ref_pixels", "refine_pixels"} & set(shipped[0])
    library = Video2LoRAGenerator.from_pretrained(tiny_i2v_backbone_dir, ckpt, generation, device="cpu")
    for r, uri in zip(shipped, refs):
        ref = read_video(uri, 9, 32, 32)
        ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # the pipeline decodes references to uint8
        latents = library.backbone.encode_video(ref[None])[0]
        assert r["refine_latent_shape"] == ",".join(map(str, latents.shape))
        assert torch.equal(torch.frombuffer(bytearray(r["refine_latents"]), dtype=torch.float32).reshape(latents.shape),
                           latents)
        assert len(r["refine_latents"]) < len(fetched.loc[0, "ref_pixels"][0]) / 8  # the payload is the latents
        first = torch.frombuffer(bytearray(r["refine_first_frame"]), dtype=torch.uint8).reshape(3, 32, 32)
        assert torch.equal(first.float() / 127.5 - 1, ref[:, 0])
        r["_lora"] = gen._lora(r)
        expected = library.refine_loras(library.predict_loras([ref]), [ref], [r["reference_prompt"]])[0]
        gen._refine([r])
        assert r["t_refine_s"] > 0
        torch.testing.assert_close(r["_lora"].a_pred, expected.a_pred, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["_lora"].b_pred, expected.b_pred, rtol=0, atol=1e-6)
    plain = hyper.__class__(tiny_i2v_backbone_dir, ckpt, config(tiny_i2v_backbone_dir, ckpt, tmp_path / "o2"))
    assert all(r["refine_latents"] == b"" for r in plain(fetched).to_dict("records"))  # not refining: nothing shipped


def test_refining_stage_measures_each_reference_fit_and_refines_for_the_steps_it_picks(
        ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path, monkeypatch):
    """--refine-steps-unfamiliar: the generation stage measures the fit of each refined reference's predicted LoRA,
    records it in `reference_fit` (also on a row that reuses the refinement) and refines for the steps the fit picks,
    as the library does."""
    from pipelines.stages import GenerateStage, HypernetStage, fetch_and_decode
    from video2lora.generate import Video2LoRAGenerator

    _, refs = clips
    generation = GenerationConfig(**GEN, step_cache="none", refine_steps=2, refine_lr=1e-2, refine_steps_unfamiliar=4)
    cfg = config(tiny_backbone_dir, checkpoint, tmp_path / "out", generation=generation, hyper_batch_size=1)
    rows = [dict(GEN, sample_id=f"s{i}", reference_uris=[refs[i % 2]], reference_weights=[1.0],
                 reference_prompt="a red circle", prompt="a cat", negative_prompt="", seed=i, lora_strength=1.0,
                 lora_uri="", image_uri="") for i in range(3)]  # s0 and s2 share their reference
    hyper, gen = HypernetStage(tiny_backbone_dir, checkpoint, cfg), GenerateStage(tiny_backbone_dir, checkpoint, cfg)
    shipped = hyper(fetch_and_decode(pd.DataFrame(rows), cfg)).to_dict("records")
    for r in shipped:
        r.update(_lora=gen._lora(r), t_refine_s=0.0)
    gen._refine(shipped)
    library = Video2LoRAGenerator.from_pretrained(tiny_backbone_dir, checkpoint, generation, device="cpu")
    for r, uri in zip(shipped[:2], refs[:2]):
        ref = read_video(uri, 9, 32, 32)
        ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # the pipeline decodes references to uint8
        args = library.predict_loras([ref]), [library.backbone.encode_video(ref[None])[0]], [ref[:, 0]], ["a red circle"]
        fit = library.reference_fits_from_latents(*args)[0]
        assert r["reference_fit"] == pytest.approx(fit, abs=1e-5)
        expected = library.refine_loras_from_latents(*args, fits=[fit])[0]
        torch.testing.assert_close(r["_lora"].a_pred, expected.a_pred, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["_lora"].b_pred, expected.b_pred, rtol=0, atol=1e-6)
    assert shipped[0]["reference_fit"] < 1 < shipped[1]["reference_fit"]  # both step counts are exercised
    assert shipped[2]["t_refine_s"] == 0 and shipped[2]["reference_fit"] == shipped[0]["reference_fit"]
    assert shipped[2]["_lora"] is shipped[0]["_lora"]
    # the fit picks the steps: a fit that cannot be measured fails its rows, naming the error
    failing = GenerateStage(tiny_backbone_dir, checkpoint, cfg)
    monkeypatch.setattr(failing.generator, "reference_fits_from_latents", lambda *a, **k: 1 / 0)
    made = failing(hyper(fetch_and_decode(pd.DataFrame(rows), cfg))).to_dict("records")
    assert all(r["status"] == "failed" and "division by zero" in r["error"] for r in made)


def test_a_zero_shot_job_can_measure_each_reference_fit_without_refining(
        ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path, monkeypatch):
    """--measure-reference-fit with --refine-steps 0: each single-reference row gets its reference's fit (the
    library's, of the predicted LoRA) and keeps the predicted LoRA; a mix gets none. A fit that cannot be measured
    is left empty and the row goes on."""
    from pipelines.stages import GenerateStage, HypernetStage, fetch_and_decode
    from video2lora.generate import Video2LoRAGenerator

    _, refs = clips
    generation = GenerationConfig(**GEN, step_cache="none", measure_reference_fit=True)
    cfg = config(tiny_backbone_dir, checkpoint, tmp_path / "out", generation=generation, hyper_batch_size=1)
    row = dict(GEN, reference_prompt="a red circle", prompt="a cat", negative_prompt="", lora_strength=1.0,
               lora_uri="", image_uri="")
    rows = [dict(row, sample_id="one", reference_uris=[refs[0]], reference_weights=[1.0], seed=1),
            dict(row, sample_id="mix", reference_uris=refs[:2], reference_weights=[0.5, 0.5], seed=2)]
    hyper, gen = HypernetStage(tiny_backbone_dir, checkpoint, cfg), GenerateStage(tiny_backbone_dir, checkpoint, cfg)
    fetched = fetch_and_decode(pd.DataFrame(rows), cfg)
    shipped = hyper(fetched).to_dict("records")
    assert shipped[0]["refine_latents"] and not shipped[1]["refine_latents"]
    made = gen(pd.DataFrame(shipped)).to_dict("records")
    assert [r["status"] for r in made] == ["pending", "pending"] and made[0]["video"] and made[1]["video"]
    library = Video2LoRAGenerator.from_pretrained(tiny_backbone_dir, checkpoint, generation, device="cpu")
    ref = read_video(refs[0], 9, 32, 32)
    ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # the pipeline decodes references to uint8
    predicted = library.predict_loras([ref])
    fit = library.reference_fits_from_latents(predicted, [library.backbone.encode_video(ref[None])[0]], [ref[:, 0]],
                                              ["a red circle"])[0]
    assert made[0]["reference_fit"] == pytest.approx(fit, abs=1e-5) and pd.isna(made[1]["reference_fit"])
    # the video is the predicted LoRA's: what a job without the fit makes
    plain = GenerateStage(tiny_backbone_dir, checkpoint, config(tiny_backbone_dir, checkpoint, tmp_path / "o2",
                                                                generation=GenerationConfig(**GEN, step_cache="none")))
    assert plain(pd.DataFrame(shipped)).to_dict("records")[0]["video"] == made[0]["video"]
    # a fit that fails is a warning, not a failed row
    fresh = GenerateStage(tiny_backbone_dir, checkpoint, cfg)
    monkeypatch.setattr(fresh.generator, "reference_fits_from_latents", lambda *a, **k: 1 / 0)
    again = fresh(pd.DataFrame(shipped)).to_dict("records")
    assert again[0]["status"] == "pending" and again[0]["video"] == made[0]["video"] and pd.isna(again[0]["reference_fit"])
    monkeypatch.undo()  # the next batch measures it again
    assert fresh(pd.DataFrame(shipped)).to_dict("records")[0]["reference_fit"] == pytest.approx(fit, abs=1e-5)


def test_resume_skips_finished_rows(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path, monkeypatch):
    """...and the driver reads the checkpoint's weights once per job (check_artifacts hands their identity to the
    row fingerprints), whether every row, some or none is left to do."""
    from video2lora import storage
    from video2lora.hypernet import WEIGHTS_NAME

    weights_read, original = [], storage.read_bytes

    def counting(uri, *args, **kwargs):
        weights_read.extend([uri] if str(uri).endswith(WEIGHTS_NAME) else [])
        return original(uri, *args, **kwargs)

    monkeypatch.setattr("video2lora.storage.read_bytes", counting)  # the driver's reads (actors are other processes)
    monkeypatch.setattr("pipelines.fingerprint.read_bytes", counting)
    monkeypatch.setattr("pipelines.batch.read_bytes", counting)
    _, refs = clips
    rows = [{"sample_id": f"s{i}", "reference_uri": refs[i % 3], "prompt": "a red circle", "seed": i} for i in range(5)]
    out = tmp_path / "out"
    cfg = config(tiny_backbone_dir, checkpoint, out)
    run_batch_job(write_manifest(tmp_path / "part.parquet", rows[:2]), cfg, progress=False)
    assert len(weights_read) == 1
    first = {p: os.stat(out / "videos" / p).st_mtime_ns for p in os.listdir(out / "videos")}
    os.remove(out / "results.parquet")  # as if the driver died before its last flush: sidecars remain
    summary = run_batch_job(write_manifest(tmp_path / "all.parquet", rows), cfg, progress=False)
    assert summary["ok"] == 3 and summary["skipped"] == 2
    for p, mtime in first.items():
        assert os.stat(out / "videos" / p).st_mtime_ns == mtime  # not redone
    res = results_of(str(out))
    assert set(res.status) == {"ok", "skipped"} and len(res) == 5
    again = run_batch_job(write_manifest(tmp_path / "all.parquet", rows), cfg, progress=False)
    assert again["ok"] == 0 and again["skipped"] == 5
    assert len(weights_read) == 3  # one read per job


def test_resume_refuses_rows_that_changed(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path):
    """A resume matches rows by sample_id and by what made them: a row whose prompt, reference or settings, or a
    job whose checkpoint or step cache changed, stops the job before any work, naming the rows; --redo-changed
    makes exactly those again."""
    from pipelines.batch import ChangedRows

    _, refs = clips
    rows = [{"sample_id": f"s{i}", "reference_uri": refs[i], "prompt": "a red circle", "seed": i} for i in range(3)]
    out = tmp_path / "out"
    cfg = config(tiny_backbone_dir, checkpoint, out)
    run_batch_job(write_manifest(tmp_path / "m.parquet", rows), cfg, progress=False)
    first = {p: (out / "videos" / p).read_bytes() for p in os.listdir(out / "videos")}
    fingerprints = results_of(str(out)).row_fingerprint.to_dict()
    assert len(set(fingerprints.values())) == 3 and all(isinstance(f, str) for f in fingerprints.values())

    edited = [dict(rows[0]), dict(rows[1], prompt="a blue square"), dict(rows[2], lora_strength=0.5)]
    with pytest.raises(ChangedRows, match=r"2 row\(s\).*'s1', 's2'.*--redo-changed"):
        run_batch_job(write_manifest(tmp_path / "edited.parquet", edited), cfg, progress=False)
    assert {p: (out / "videos" / p).read_bytes() for p in os.listdir(out / "videos")} == first  # nothing lost
    assert results_of(str(out)).row_fingerprint.to_dict() == fingerprints

    redo = run_batch_job(write_manifest(tmp_path / "edited.parquet", edited),
                         config(tiny_backbone_dir, checkpoint, out, redo_changed=True), progress=False)
    assert redo["ok"] == 2 and redo["skipped"] == 1
    res = results_of(str(out))
    assert res.loc["s0", "row_fingerprint"] == fingerprints["s0"] and (out / "videos" / "s0.mp4").read_bytes() == first["s0.mp4"]
    assert res.loc["s1", "row_fingerprint"] != fingerprints["s1"] and (out / "videos" / "s1.mp4").read_bytes() != first["s1.mp4"]
    assert run_batch_job(write_manifest(tmp_path / "edited.parquet", edited), cfg, progress=False)["skipped"] == 3

    other_sampler = config(tiny_backbone_dir, checkpoint, out, generation=GenerationConfig(**GEN, step_cache="none"))
    with pytest.raises(ChangedRows, match="3 row"):  # a job-wide change: every row
        run_batch_job(write_manifest(tmp_path / "edited.parquet", edited), other_sampler, progress=False)


def test_max_failures_stops_but_keeps_results(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path):
    d, refs = clips
    rows = [{"sample_id": f"bad{i}", "reference_uri": str(d / "corrupt.mp4"), "prompt": "x"} for i in range(3)]
    rows.append({"sample_id": "good", "reference_uri": refs[0], "prompt": "x"})
    out = tmp_path / "out"
    with pytest.raises(TooManyFailures, match="max-failures"):
        run_batch_job(write_manifest(tmp_path / "m.parquet", rows), config(tiny_backbone_dir, checkpoint, out, max_failures=1),
                      progress=False)
    res = results_of(str(out))
    assert len(res) == 4 and (res.status == "failed").sum() >= 2


def test_manifest_schema_errors_stop_before_work(tmp_path):
    with pytest.raises(ManifestError, match="prompt"):
        read_manifest(write_manifest(tmp_path / "a.parquet", [{"sample_id": "a", "reference_uri": "x"}]))
    with pytest.raises(ManifestError, match="'seed' has type string"):
        read_manifest(write_manifest(tmp_path / "b.parquet", [{"sample_id": "a", "reference_uri": "x", "prompt": "p", "seed": "one"}]))
    with pytest.raises(ManifestError, match="duplicate sample_id values: \\['a'\\]"):
        read_manifest(write_manifest(tmp_path / "c.parquet", [{"sample_id": "a", "reference_uri": "x", "prompt": "p"}] * 2))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(str(tmp_path / "none.parquet"))


def test_job_against_s3(ray_local, s3_server, tiny_backbone_dir, checkpoint, clips, tmp_path):
    import boto3

    from video2lora.storage import exists, join, write_bytes_atomic

    _, refs = clips
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="v2l")
    rows = []
    for i in range(2):
        write_bytes_atomic(f"s3://v2l/refs/ref{i}.mp4", open(refs[i], "rb").read())
        rows.append({"sample_id": f"s3row{i}", "reference_uri": f"refs/ref{i}.mp4", "prompt": "a red circle", "seed": i})
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    write_bytes_atomic("s3://v2l/manifest.parquet", buf.getvalue())  # relative URIs resolve next to it
    summary = run_batch_job("s3://v2l/manifest.parquet", config(tiny_backbone_dir, checkpoint, "s3://v2l/out"), progress=False)
    assert summary["ok"] == 2
    assert exists("s3://v2l/out/videos/s3row0.mp4") and exists(join("s3://v2l/out", "results.parquet"))
    again = run_batch_job("s3://v2l/manifest.parquet", config(tiny_backbone_dir, checkpoint, "s3://v2l/out"), progress=False)
    assert again["skipped"] == 2
    # the results page of an s3:// output: written there, previews beside it (made by Ray tasks reading S3)
    from pipelines.gallery import write_gallery
    from video2lora.storage import read_bytes

    assert write_gallery("s3://v2l/out") == "s3://v2l/out/index.html"
    page = read_bytes("s3://v2l/out/index.html").decode()
    for name in ("s3row0.ref0", "s3row0.out", "s3row1.ref0", "s3row1.out"):
        assert f'src="gallery/{name}.gif"' in page and exists(f"s3://v2l/out/gallery/{name}.gif"), name


def test_backbone_defaults_do_not_override_explicit_flags(tiny_backbone_dir):
    cfg = BatchJobConfig(backbone=tiny_backbone_dir, generation=GenerationConfig(steps=3))
    apply_backbone_defaults(cfg, explicit={"steps"})
    assert (cfg.generation.num_frames, cfg.generation.height, cfg.generation.steps) == (9, 32, 3)


def test_generation_stage_calibrates_its_step_cache_when_it_starts(ray_local, tiny_backbone_dir, checkpoint):
    """A generation actor (and a Serve replica, the same stage) runs magcache's calibration when it starts, at the
    configured size, steps and CFG scale: its first rows, or a replica's first request, do not pay for it."""
    from pipelines.stages import GenerateStage

    stage = GenerateStage(tiny_backbone_dir, checkpoint, config(tiny_backbone_dir, checkpoint, "unused"))
    at = (GEN["steps"], GEN["guidance_scale"], GEN["num_frames"], GEN["height"], GEN["width"])
    assert GenerationConfig().step_cache == "magcache" and list(stage.generator.step_cost.mag_ratios) == [at]
    none = config(tiny_backbone_dir, checkpoint, "unused", generation=GenerationConfig(**GEN, step_cache="none"))
    assert not GenerateStage(tiny_backbone_dir, checkpoint, none).generator.step_cost.mag_ratios


def test_blended_and_reused_rows(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path):
    """Manifest rows that mix references by weight or reuse an exported LoRA file, beside plain rows in one batch;
    bad mixes and files fail only their own row, naming the column."""
    from safetensors.torch import load, save

    _, refs = clips
    first = [{"sample_id": "plain", "reference_uri": refs[2], "prompt": "a cat", "seed": 4, "lora_strength": 0.7}]
    out1 = tmp_path / "out1"
    run_batch_job(write_manifest(tmp_path / "m1.parquet", first),
                  config(tiny_backbone_dir, checkpoint, out1, export_loras=True), progress=False)
    exported = str(out1 / "loras" / "plain.safetensors")
    state = load(open(exported, "rb").read())
    bad_file = tmp_path / "bad.safetensors"
    bad_file.write_bytes(save({k: (v[:, :3] if k.endswith("lora_A.weight") else v) for k, v in state.items()}))
    rows = [
        {"sample_id": "single", "reference_uri": refs[0], "prompt": "a red circle", "seed": 1},
        {"sample_id": "mix_of_one", "reference_uris": [refs[0]], "reference_weights": [1.0], "prompt": "a red circle",
         "seed": 1},
        {"sample_id": "mix", "reference_uris": [refs[0], refs[1]], "reference_weights": [0.6, 0.4],
         "prompt": "a red circle", "seed": 1},
        {"sample_id": "mix_even", "reference_uris": refs, "prompt": "a red circle", "seed": 1},
        {"sample_id": "reused", "lora_uri": exported, "prompt": "a cat", "seed": 4},
        {"sample_id": "bare", "reference_uri": refs[2], "prompt": "a cat", "seed": 4, "lora_strength": 0.0},
        {"sample_id": "nan_weight", "reference_uris": refs[:2], "reference_weights": [0.5, float("nan")], "prompt": "x"},
        {"sample_id": "lengths", "reference_uris": refs[:2], "reference_weights": [1.0], "prompt": "x"},
        {"sample_id": "too_many", "reference_uris": [refs[0]] * 9, "prompt": "x"},
        {"sample_id": "two_sources", "reference_uri": refs[0], "lora_uri": exported, "prompt": "x"},
        {"sample_id": "bad_file", "lora_uri": str(bad_file), "prompt": "x"},
    ]
    out = tmp_path / "out"
    summary = run_batch_job(write_manifest(tmp_path / "m.parquet", rows),
                            config(tiny_backbone_dir, checkpoint, out, export_loras=True), progress=False)
    res = results_of(str(out))
    assert summary["ok"] == 6, res[["status", "error"]]
    assert "reference_weights" in res.loc["nan_weight", "error"]
    assert "2 weights" not in res.loc["lengths", "error"] and "1 weights for 2" in res.loc["lengths", "error"]
    assert "reference_uris has 9 references" in res.loc["too_many", "error"]
    assert "lora_uri" in res.loc["two_sources", "error"]
    assert "lora_uri" in res.loc["bad_file", "error"] and "shape" in res.loc["bad_file", "error"]
    lora = {s: load((out / "loras" / f"{s}.safetensors").read_bytes()) for s in ("single", "mix_of_one", "mix", "mix_even")}
    assert lora["single"].keys() == lora["mix_of_one"].keys()  # one reference at weight 1 is the plain row's LoRA,
    assert all(torch.equal(lora["single"][k], lora["mix_of_one"][k]) for k in lora["single"])  # bit for bit
    some = next(k for k in lora["single"] if k.endswith("lora_B.weight"))  # B carries the predicted factor
    assert len({lora[s][some].sum().item() for s in ("single", "mix", "mix_even")}) == 3
    assert res.loc["single", "reference_hash"] == res.loc["mix_of_one", "reference_hash"]
    assert res.loc["mix", "reference_hash"].count("+") == 1 and res.loc["mix_even", "reference_hash"].count("+") == 2
    # the videos: same LoRA, prompt and seed give the same video, up to float differences between batch slots (the
    # two rows may land in different batches; on another CPU one CI run differed in a few pixels), far below
    # what another mix of references changes
    video = {s: read_video(str(out / "videos" / f"{s}.mp4"), 9, 32, 32) for s in ("single", "mix_of_one", "mix")}
    same, other = float((video["single"] - video["mix_of_one"]).abs().mean()), float((video["single"] - video["mix"]).abs().mean())
    assert same < 0.01 and same < 0.1 * other, (same, other)
    assert not res.loc["reused", "lora_cache_hit"]
    # with --export-loras the reused row writes its own file (its strength baked in): at strength 1, the file it read
    assert res.loc["reused", "lora_uri"] == str(out / "loras" / "reused.safetensors")
    again = load((out / "loras" / "reused.safetensors").read_bytes())
    assert again.keys() == state.keys() and all(torch.allclose(again[k], state[k], rtol=1e-6, atol=0) for k in state)
    # without it, the row names the file it read
    run_batch_job(write_manifest(tmp_path / "m2.parquet", [rows[4]]), config(tiny_backbone_dir, checkpoint, tmp_path / "out2"),
                  progress=False)
    assert results_of(str(tmp_path / "out2")).loc["reused", "lora_uri"] == exported
    # the reused file carries its row's strength (0.7): at strength 1 it makes that row's video again
    plain, reused = read_video(str(out1 / "videos" / "plain.mp4"), 9, 32, 32), read_video(str(out / "videos" / "reused.mp4"), 9, 32, 32)
    bare = read_video(str(out / "videos" / "bare.mp4"), 9, 32, 32)  # the same row without its LoRA
    # not bit for bit: the exported file applies the LoRA in another order and another batch, and float differences
    # grow over the denoising steps (one full-suite run: 0.023); the LoRA itself moves the video far more
    gap, lora_effect = float((plain - reused).abs().mean()), float((plain - bare).abs().mean())
    assert gap < 0.05 and gap < 0.25 * lora_effect, (gap, lora_effect)


def scrape_job_metrics(job: str, until, timeout: float = 30.0) -> dict[str, float]:
    """This node's Prometheus endpoint, summed per series name + its status/stage/result tag, for one job; read
    again until `until(values)` holds (metrics reach the endpoint every 0.5 s here) or the timeout passes."""
    import re
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(ray_video2lora_\w+)\{(.*)\} (\S+)$", line)
            if not m or f'job="{job}"' not in m.group(2):
                continue
            tag = re.search(r'(?:status|stage|result|le)="([^"]*)"', m.group(2))
            key = m.group(1) + (f"[{tag.group(1)}]" if tag else "")
            out[key] = out.get(key, 0.0) + float(m.group(3))
        if until(out) or time.time() > deadline:
            return out
        time.sleep(0.5)


def test_job_metrics_read_back_from_ray(ray_local, tiny_backbone_dir, checkpoint, clips, tmp_path):
    d, refs = clips
    rows = [{"sample_id": f"m{i}", "reference_uri": refs[i % 2], "prompt": "a red circle", "seed": i} for i in range(4)]
    rows.append({"sample_id": "bad", "reference_uri": str(d / "corrupt.mp4"), "prompt": "x"})
    rows.append({"sample_id": "nan", "reference_uri": refs[0], "prompt": "x", "guidance_scale": float("nan")})
    out = tmp_path / "out"
    run_batch_job(write_manifest(tmp_path / "m.parquet", rows), config(tiny_backbone_dir, checkpoint, out), progress=False)
    m = scrape_job_metrics(str(out), lambda m: m.get("ray_video2lora_rows_total[ok]") == 4
                           and m.get("ray_video2lora_rows_in_flight") == 0)
    assert m.get("ray_video2lora_rows_total[ok]") == 4 and m.get("ray_video2lora_rows_total[failed]") == 2, m
    assert m.get("ray_video2lora_lora_cache_total[hit]") == 2 and m.get("ray_video2lora_lora_cache_total[miss]") == 2, m
    for stage in ("fetch", "hypernet", "generate", "write"):
        assert m.get(f"ray_video2lora_stage_seconds_count[{stage}]", 0) >= 4, (stage, m)
    assert m.get("ray_video2lora_rows_in_flight") == 0, m
    # the same job again: every row done is skipped, and counted so
    run_batch_job(write_manifest(tmp_path / "m.parquet", rows), config(tiny_backbone_dir, checkpoint, out), progress=False)
    m = scrape_job_metrics(str(out), lambda m: m.get("ray_video2lora_rows_total[skipped]") == 4)
    assert m.get("ray_video2lora_rows_total[skipped]") == 4, m
