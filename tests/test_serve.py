"""The online app (pipelines/serve.py) on a local Ray Serve instance on 127.0.0.1, through a real HTTP client."""

import concurrent.futures as futures
import os
import socket
import time

import pytest
import requests
from conftest import save_model_for, write_clips

from pipelines.config import ServeConfig
from video2lora.config import GenerationConfig

GEN = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=6.0)
MAX_BYTES = 2 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-clips")
    return d, write_clips(d, 3, seed=21)


@pytest.fixture(scope="module")
def checkpoint(tiny_backbone_dir, tmp_path_factory):
    return save_model_for(tiny_backbone_dir, str(tmp_path_factory.mktemp("serve-ckpt")))


def serve_config(backbone, checkpoint, **kw):
    return ServeConfig(backbone=backbone, checkpoint=checkpoint, generation=GenerationConfig(**GEN),
                       max_request_bytes=MAX_BYTES, replica_num_cpus=0.2, **kw)


@pytest.fixture(scope="module")
def service(tiny_backbone_dir, checkpoint, clips):
    """Ray + Serve on 127.0.0.1 with the tiny models; yields (base URL, a function that redeploys with a config)."""
    import ray
    from ray import serve

    from pipelines.serve import build_app

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    def deploy(**kw):
        # a local directory may be allowed for reference_uri on a single machine: the clips' own
        cfg = serve_config(tiny_backbone_dir, checkpoint, **{"batch_size": 2, "batch_wait_timeout_s": 1.0,
                                                             "reference_uri_prefixes": ("s3://", str(clips[0])), **kw})
        serve.run(build_app(cfg), name="video2lora", route_prefix="/")
        assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
        return cfg

    deploy()
    yield url, deploy
    serve.shutdown()
    ray.shutdown()


def post(url, ref_path=None, files=None, timeout=120, **fields):
    files = dict(files or {})
    if ref_path:
        files["reference"] = ("ref.mp4", open(ref_path, "rb").read(), "video/mp4")
    return requests.post(f"{url}/generate", data={k: str(v) for k, v in fields.items()}, files=files, timeout=timeout)


def assert_same_video(a, b):
    """Two answers for the same request (same reference hash and seed): the same frames up to float rounding.
    Not byte for byte: a request may be denoised in a batch with others or retried, and even two batches of one on
    the same replica were seen to differ in the last bits (a mean frame difference far below 0.01)."""
    assert a.headers["x-reference-hash"] == b.headers["x-reference-hash"] and a.headers["x-seed"] == b.headers["x-seed"]
    diff = 0.0 if a.content == b.content else float((frames(a.content) - frames(b.content)).abs().mean())
    print(f"same request twice: {'identical files' if diff == 0 else f'mean frame difference {diff:.2e}'}")
    assert diff < 0.01, (diff, dict(a.headers), dict(b.headers))


def frames(mp4: bytes):
    from video2lora.video_io import decode_video

    return decode_video(mp4, "response", 9, 32, 32)


def test_video_equals_the_batch_jobs_for_the_same_row(service, tiny_backbone_dir, checkpoint, clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.batch import run_batch_job
    from pipelines.config import BatchJobConfig

    url, _ = service
    _, refs = clips
    row = {"sample_id": "row0", "reference_uri": refs[0], "prompt": "a red circle", "seed": 5, "lora_strength": 0.8}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "m.parquet")
    cfg = BatchJobConfig(backbone=tiny_backbone_dir, checkpoint=checkpoint, output=str(tmp_path / "out"),
                         generation=GenerationConfig(**GEN), actor_num_cpus=0.2, decode_num_cpus=0.2)
    assert run_batch_job(str(tmp_path / "m.parquet"), cfg, progress=False)["ok"] == 1
    batch_video = (tmp_path / "out" / "videos" / "row0.mp4").read_bytes()

    r = post(url, refs[0], prompt="a red circle", seed=5, lora_strength=0.8)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.headers["x-seed"] == "5"
    assert "generate;dur=" in r.headers["server-timing"]
    # the same row: the same frames up to float rounding (identical files on this machine; see assert_same_video)
    assert r.content == batch_video or float((frames(r.content) - frames(batch_video)).abs().mean()) < 0.01
    assert r.headers["x-lora-cache-hit"] == "false"
    again = post(url, refs[0], prompt="another prompt", seed=6)  # the same reference: its LoRA from the cache
    assert again.status_code == 200 and again.headers["x-lora-cache-hit"] == "true"
    assert again.headers["x-reference-hash"] == r.headers["x-reference-hash"]

    other = post(url, refs[1], prompt="a red circle", seed=5, lora_strength=0.8)
    assert float((frames(other.content) - frames(r.content)).abs().mean()) > 0.01  # the reference matters


def test_a_reference_uri_and_a_negative_prompt(service, clips):
    url, _ = service
    _, refs = clips
    uploaded = post(url, refs[2], prompt="a green square", seed=9)
    by_uri = post(url, prompt="a green square", seed=9, reference_uri=refs[2])  # under an allowed prefix
    assert uploaded.status_code == by_uri.status_code == 200, by_uri.text
    assert_same_video(by_uri, uploaded)  # the same reference hash, seed and frames
    negative = post(url, prompt="a green square", seed=9, reference_uri=refs[2], negative_prompt="a red circle")
    assert negative.status_code == 200, negative.text
    # CFG steers away from the negative prompt: a different video from the empty one
    assert float((frames(negative.content) - frames(uploaded.content)).abs().mean()) > 0.01


def test_concurrent_requests_with_different_references_share_one_batch(service, clips):
    url, _ = service
    _, refs = clips
    reqs = [dict(ref_path=refs[0], prompt="a blue square", seed=1), dict(ref_path=refs[2], prompt="a cat", seed=2)]
    with futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda kw: post(url, **kw), reqs))
    alone = [post(url, **kw) for kw in reqs]  # one at a time: each waits out the batch timeout alone
    for t, a in zip(together, alone):
        assert t.status_code == a.status_code == 200, (t.text, a.text)
        assert t.headers["x-batch-size"] == "2" and a.headers["x-batch-size"] == "1"
    diffs = [float((frames(t.content) - frames(a.content)).abs().mean()) for t, a in zip(together, alone)]
    between = float((frames(together[0].content) - frames(together[1].content)).abs().mean())
    # a batch of two and a batch of one round differently in float; H.264 amplifies that a little (as in
    # test_batch.py); the two requests' own difference is far larger
    assert max(diffs) < 0.01 and between > 10 * max(diffs), (diffs, between)


def test_lora_endpoint_returns_the_references_diffusers_lora(service, tiny_backbone_dir, checkpoint, clips):
    import torch
    from safetensors.torch import load

    from video2lora.generate import Video2LoRAGenerator
    from video2lora.video_io import read_video

    url, _ = service
    _, refs = clips
    r = requests.post(f"{url}/lora", files={"reference": open(refs[1], "rb")}, data={"lora_strength": "0.5"}, timeout=60)
    assert r.status_code == 200, r.text
    got = load(r.content)
    gen = Video2LoRAGenerator.from_pretrained(tiny_backbone_dir, checkpoint, GenerationConfig(**GEN), device="cpu")
    ref = read_video(refs[1], 9, 32, 32)
    ref = ((ref + 1) * 127.5).round() / 127.5 - 1  # references travel between the stages as uint8
    want = load(gen.export_lora(gen.predict_loras([ref])[0], 0.5))
    assert sorted(got) == sorted(want) and all(k.startswith("transformer.") for k in got)
    for k in want:  # the replica runs one torch thread, this process more: float rounding only
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


HOSTILE = [  # (form fields, files, status, field named)
    ({"prompt": "x"}, {"reference": ("a.mp4", b"this is not a video" * 40)}, 422, "reference"),
    ({"prompt": "x"}, {}, 422, "reference"),
    ({"prompt": "x", "height": "100000"}, "ref", 422, "height"),
    ({"prompt": "x", "height": "36"}, "ref", 422, "height"),
    ({"prompt": "x", "num_frames": "1025", "height": "4096", "width": "4096"}, "ref", 422, "num_frames"),
    ({"prompt": "x", "guidance_scale": "nan"}, "ref", 422, "guidance_scale"),
    ({"prompt": "x", "steps": "2.5"}, "ref", 422, "steps"),
    ({"prompt": "x", "seed": "abc"}, "ref", 422, "seed"),
    ({"prompt": "x" * 2001}, "ref", 422, "prompt"),
    ({}, "ref", 422, "prompt"),
    ({"prompt": "x", "colour": "red"}, "ref", 422, "colour"),
    ({"prompt": "x", "reference_uri": "/etc/passwd"}, {}, 422, "reference_uri"),
    ({"prompt": "x", "reference_uri": "CLIPS/../../../etc/passwd"}, {}, 422, "reference_uri"),  # climbs out of CLIPS
    ({"prompt": "x", "reference_uri": "CLIPS/missing.mp4"}, {}, 422, "reference_uri"),
    ({"prompt": "x", "reference_uri": "s3://x/y.mp4"}, "ref", 422, "reference"),
    ({"prompt": "x"}, {"reference": ("a.mp4", b"0" * (MAX_BYTES + 1))}, 413, "reference"),
    ({"prompt": "x"}, {"reference": ("a.mp4", b"x"), "image": ("i.png", b"not an image")}, 422, "image"),
]


def test_hostile_requests_get_a_4xx_naming_the_field_and_the_replica_keeps_serving(service, clips):
    url, _ = service
    _, refs = clips
    ref = ("ref.mp4", open(refs[0], "rb").read(), "video/mp4")
    for data, files, status, field in HOSTILE:
        data = {k: v.replace("CLIPS", str(clips[0])) for k, v in data.items()}
        r = requests.post(f"{url}/generate", data=data, files={"reference": ref} if files == "ref" else files,
                          timeout=60)
        assert r.status_code == status and r.json()["field"] == field, (data, r.status_code, r.text)
    # a body that is not a form; an upload whose size is only known once it streams in (chunked, no length)
    r = requests.post(f"{url}/generate", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 415 and r.json()["field"] == "content-type"
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"reference\"; filename=\"a.mp4\"\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(MAX_BYTES // 65536 + 2):
            yield b"0" * 65536

    r = requests.post(f"{url}/generate", data=chunks(), timeout=60,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and r.json()["field"] == "reference", r.text
    assert requests.get(f"{url}/generate", timeout=10).status_code == 405
    assert requests.get(f"{url}/nope", timeout=10).status_code == 404
    r = post(url, refs[0], prompt="still serving", seed=0)
    assert r.status_code == 200 and requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_a_full_queue_answers_503(service, clips):
    url, deploy = service
    _, refs = clips
    deploy(batch_size=1, batch_wait_timeout_s=0.0, max_queued_requests=1)
    try:
        with futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: post(url, refs[i % 3], prompt="x", seed=i, steps=30), range(6)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and 503 in codes, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert "queue full" in busy.json()["error"] and busy.headers["retry-after"] == "1"
    finally:
        deploy()


def test_a_request_past_its_deadline_gets_a_504(service, clips):
    url, deploy = service
    _, refs = clips
    deploy(request_timeout_s=1.0)
    try:
        start = time.time()
        r = post(url, refs[0], prompt="x", seed=1, steps=200)
        assert r.status_code == 504 and "1 s" in r.json()["error"] and time.time() - start < 30
    finally:
        deploy()


def test_a_replica_killed_mid_request_is_retried_on_its_replacement(service, clips):
    import ray

    url, _ = service
    _, refs = clips

    def generator_replicas():
        return [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "Generator" in a["name"] and a["name"].startswith("SERVE_REPLICA")]

    (replica,) = generator_replicas()
    replica_before = post(url, refs[0], prompt="x", seed=3).headers["x-generator"]
    with futures.ThreadPoolExecutor(1) as pool:
        start = time.time()
        pending = pool.submit(post, url, refs[0], prompt="x", seed=3, steps=600, timeout=180)
        time.sleep(2.0)  # the request is denoising by now
        assert not pending.done()
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        r = pending.result(timeout=180)
    print("killed mid-request ->", r.status_code)
    # the ingress saw the replica die and retried once; the router held the retry until the replacement was up
    assert r.status_code == 200, r.text
    assert time.time() - start < 180
    assert r.headers["x-generator"] != replica_before  # answered by the replacement
    again = post(url, refs[0], prompt="x", seed=3, steps=600)  # the same seeded video
    assert again.status_code == 200
    assert_same_video(again, r)
    assert post(url, refs[1], prompt="after", seed=4).status_code == 200


def test_replicas_hold_what_the_readme_says(service):
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name="video2lora")
    assert handle.held_modules.remote().result() == ["aux", "text_encoder", "transformer", "vae"]
    predictor = serve.get_deployment_handle("LoRAPredictor", app_name="video2lora")
    assert predictor.held_modules.remote().result() == ["vae.encoder", "hypernetwork"]


def test_serve_settings_from_app_args():
    cfg = ServeConfig.from_args({"batch_size": "8", "generator_num_gpus": 1, "generation": {"steps": 30},
                                 "reference_uri_prefixes": ["s3://bucket/refs/"]})
    assert cfg.batch_size == 8 and cfg.generator_num_gpus == 1.0 and cfg.generation.steps == 30
    assert cfg.reference_uri_prefixes == ("s3://bucket/refs/",)
    with pytest.raises(ValueError, match="batch_sise"):
        ServeConfig.from_args({"batch_sise": 8})
    with pytest.raises(ValueError, match="stepz"):
        ServeConfig.from_args({"generation": {"stepz": 3}})


def test_mixed_references_and_an_uploaded_lora_file(service, tiny_backbone_dir, checkpoint, clips):
    import torch
    from safetensors.torch import load, save

    from video2lora.generate import Video2LoRAGenerator
    from video2lora.predict import PredictedLoRA
    from video2lora.video_io import read_video

    url, _ = service
    _, refs = clips
    files = [("reference", (f"r{i}.mp4", open(refs[i], "rb").read(), "video/mp4")) for i in (0, 1)]
    # the mix's LoRA file is the library's blend of the two references
    r = requests.post(f"{url}/lora", files=files, data={"reference_weights": "0.6,0.4"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-reference-hash"].count("+") == 1
    gen = Video2LoRAGenerator.from_pretrained(tiny_backbone_dir, checkpoint, GenerationConfig(**GEN), device="cpu")
    clips_u8 = [((read_video(p, 9, 32, 32) + 1) * 127.5).round() / 127.5 - 1 for p in refs[:2]]
    want = load(gen.export_lora(PredictedLoRA.blend(gen.predict_loras(clips_u8), [0.6, 0.4]), 1.0))
    got = load(r.content)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    assert got[next(k for k in got if k.endswith("lora_A.weight"))].shape[0] == 2  # rank 1 + rank 1
    # a video from a mix; the same mix's LoRA file uploaded instead gives the same video
    mixed = requests.post(f"{url}/generate", files=files, data={"prompt": "a mix", "seed": "7",
                                                                "reference_weights": "0.6,0.4"}, timeout=120)
    reused = requests.post(f"{url}/generate", files={"lora": ("mix.safetensors", r.content)},
                           data={"prompt": "a mix", "seed": "7"}, timeout=120)
    single = post(url, refs[0], prompt="a mix", seed=7)
    assert mixed.status_code == reused.status_code == single.status_code == 200, (mixed.text, reused.text)
    diff = float((frames(mixed.content) - frames(reused.content)).abs().mean())
    effect = float((frames(mixed.content) - frames(single.content)).abs().mean())
    assert diff < 0.01 and effect > 10 * diff, (diff, effect)
    # one reference at weight 1 is the plain request (the same video up to float rounding; see assert_same_video)
    one = requests.post(f"{url}/generate", files=[files[0]], data={"prompt": "a mix", "seed": "7",
                                                                   "reference_weights": "1"}, timeout=120)
    assert one.status_code == 200, one.text
    assert_same_video(one, single)
    # bad mixes and files name the field
    bad_file = save({k: (v[:, :3] if k.endswith("lora_A.weight") else v).contiguous() for k, v in got.items()})
    for data, fls, field in [({"reference_weights": "a,b"}, files, "reference_weights"),
                             ({"reference_weights": "1,2,3"}, files, "reference_weights"),
                             ({"reference_weights": "nan,1"}, files, "reference_weights"),
                             ({}, files + [("lora", ("x.safetensors", r.content))], "lora"),
                             ({}, {"lora": ("bad.safetensors", bad_file)}, "lora"),
                             ({}, {"lora": ("junk.safetensors", b"not a safetensors file")}, "lora")]:
        answer = requests.post(f"{url}/generate", files=fls, data={"prompt": "x", **data}, timeout=60)
        assert answer.status_code == 422 and answer.json()["field"] == field, (data, answer.text)


def test_built_app_scales_generators_on_queued_requests_and_bounds_every_queue():
    """build_app's deployment options (no Ray needed): autoscaling when generator_max_replicas is above
    generator_replicas, a fixed count otherwise; both model deployments' queues bounded (a full one answers 503)."""
    from pipelines.serve import build_app, resolve

    def deployments(cfg):
        ingress = build_app(cfg)._bound_deployment
        _, predictor, generator = ingress.init_args
        return ingress, predictor._bound_deployment, generator._bound_deployment

    _, predictor, generator = deployments(ServeConfig(generator_replicas=2, generator_max_replicas=6, batch_size=4,
                                                      max_queued_requests=10))
    scale = generator._deployment_config.autoscaling_config
    assert (scale.min_replicas, scale.max_replicas, scale.target_ongoing_requests) == (2, 6, 4)
    assert generator._deployment_config.max_ongoing_requests == 4  # one batch in flight per replica
    assert generator._deployment_config.max_queued_requests == predictor._deployment_config.max_queued_requests == 10
    _, _, fixed = deployments(ServeConfig(generator_replicas=3))
    assert fixed._deployment_config.autoscaling_config is None and fixed._deployment_config.num_replicas == 3
    on_gpus = resolve(ServeConfig(), cluster_gpus=8)  # a GPU cluster: a GPU per generator, a quarter per predictor
    assert (on_gpus.generator_num_gpus, on_gpus.predictor_num_gpus) == (1.0, 0.25)
    assert (resolve(ServeConfig(), 0).generator_num_gpus, resolve(ServeConfig(), 0).predictor_num_gpus) == (0.0, 0.0)


def test_an_i2v_backbone_takes_the_first_frame(service, tiny_i2v_backbone_dir, tmp_path, clips):
    """A second app on an image-to-video backbone, under its own route prefix: `image` (the first frame) is taken
    and required there. (The tiny I2V model barely moves with its first frame - 0.001 mean - far below what H.264
    keeps, so the image's effect on the frames is checked in the library, tests/test_model.py.)"""
    import numpy as np
    from PIL import Image
    from ray import serve

    from pipelines.serve import build_app

    url, _ = service
    _, refs = clips
    ckpt = save_model_for(tiny_i2v_backbone_dir, str(tmp_path / "i2v-ckpt"))
    serve.run(build_app(serve_config(tiny_i2v_backbone_dir, ckpt, batch_size=2, batch_wait_timeout_s=0.2)),
              name="i2v", route_prefix="/i2v")
    try:
        path = tmp_path / "first.png"
        Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        with_image = post(f"{url}/i2v", refs[0], files={"image": ("f.png", path.read_bytes(), "image/png")},
                          prompt="a dog", seed=4)
        assert with_image.status_code == 200 and with_image.headers["content-type"] == "video/mp4", with_image.text
        assert frames(with_image.content).shape == (3, 9, 32, 32)
        without = post(f"{url}/i2v", refs[0], prompt="a dog", seed=4)
        assert without.status_code == 422 and without.json()["field"] == "image", without.text
        assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}  # the first app still answers
    finally:
        serve.delete("i2v")
