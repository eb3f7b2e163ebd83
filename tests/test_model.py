"""The library on the tiny CogVideoX backbones: generation, export, artifacts, sizes."""

import json
import os

import pytest
import torch
from conftest import make_model, random_clips

from video2lora.backbones import Backbone
from video2lora.config import GenerationConfig
from video2lora.export import check_lora_file, export_lora_bytes
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.hypernet import Video2LoRAModel

# the paper's sampler exactly (no step cache): these tests compare against the stock diffusers pipeline
GEN = GenerationConfig(num_frames=9, height=32, width=32, steps=3, guidance_scale=6.0, step_cache="none")


@pytest.fixture(scope="module")
def generator(tiny_backbone_dir):
    backbone = Backbone.from_pretrained(tiny_backbone_dir, device="cpu")
    return Video2LoRAGenerator(backbone, make_model(backbone), GEN)


def test_backbone_matches_real_layout(generator):
    layers = generator.backbone.lora_layers()
    assert [n for n, _, _ in layers[:4]] == [
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
        "transformer_blocks.0.attn1.to_v", "transformer_blocks.0.attn1.to_out.0",
    ]
    assert len(layers) == 4 * generator.backbone.transformer.config.num_layers


def test_batch_of_mixed_loras_equals_each_row_alone(generator):
    refs = random_clips(3, seed=1)
    reqs = [GenerationRequest(p, reference=r, seed=s) for p, r, s in
            zip(["a red circle", "a blue square", "a green ring"], refs, [1, 2, 3])]
    reqs[2].reference = None  # a row without LoRA in the same batch
    batch = generator.generate(reqs)
    for req, video in zip(reqs, batch):
        alone = generator.generate([GenerationRequest(req.prompt, reference=req.reference, seed=req.seed)])[0]
        assert video.shape == (3, 9, 32, 32)
        bare = generator.generate([GenerationRequest(req.prompt, seed=req.seed)])[0]
        if req.reference is None:
            torch.testing.assert_close(video, bare, atol=1e-4, rtol=0)
            continue
        # Batched float reductions differ from batch-of-one ones in the last bits, and 3 denoising steps at CFG 6
        # amplify that at a few saturated pixels (up to 0.04 on some CPUs); the layer-level test is the exact one.
        # Here: the row is its own LoRA's video, not a neighbour's, i.e. far closer to it than to the bare video.
        effect = (bare - alone).abs()
        assert effect.mean() > 0.05  # the LoRA changes the video
        error = (video - alone).abs()
        assert error.mean() < 0.01 * effect.mean(), (error.mean(), effect.mean())
        assert error.max() < 0.1 * effect.max(), (error.max(), effect.max())
    # a neighbour's LoRA would fail the check above: the two rows' LoRAs differ by as much as a LoRA's effect
    swapped = generator.generate([GenerationRequest(reqs[0].prompt, lora=reqs[1].lora, seed=1)])[0]
    assert (swapped - batch[0]).abs().mean() > 0.1 * (batch[0] - generator.generate([GenerationRequest(reqs[0].prompt, seed=1)])[0]).abs().mean()
    assert torch.equal(generator.generate([GenerationRequest(reqs[0].prompt, seed=1)])[0],
                       generator.generate([GenerationRequest(reqs[0].prompt, seed=1)])[0])  # seeded


def test_strength_zero_equals_backbone(generator):
    ref = random_clips(1, seed=4)[0]
    bare = generator.generate([GenerationRequest("a red circle", seed=5)])[0]
    zero = generator.generate([GenerationRequest("a red circle", reference=ref, seed=5, lora_strength=0.0)])[0]
    assert torch.equal(bare, zero)


def test_references_give_different_loras_deterministically(generator):
    refs = random_clips(2, seed=6)
    a = generator.predict_loras(refs)
    b = generator.predict_loras(refs[::-1])
    torch.testing.assert_close(a[0].a_pred, b[1].a_pred, atol=1e-5, rtol=1e-5)
    assert (a[0].a_pred - a[1].a_pred).abs().max() > 1e-4


def test_exported_lora_with_stock_diffusers_gives_same_video(generator, tiny_backbone_dir, tmp_path):
    from diffusers import DiffusionPipeline

    ref = random_clips(1, seed=7)[0]
    req = GenerationRequest("a blue square", reference=ref, seed=2, lora_strength=0.7)
    ours = generator.generate([req])[0]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    model = generator.model
    path.write_bytes(export_lora_bytes(model, req.lora.a_pred, req.lora.b_pred, strength=0.7))
    check_lora_file(path.read_bytes(), str(path), model.config.layers, model.config.lora.rank)
    pipe = DiffusionPipeline.from_pretrained(tiny_backbone_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    latents = pipe(prompt=[req.prompt], negative_prompt=[""], num_frames=9, height=32, width=32,
                   num_inference_steps=GEN.steps, guidance_scale=GEN.guidance_scale,
                   generator=[torch.Generator().manual_seed(2)], output_type="latent",
                   max_sequence_length=16, return_dict=False)[0]
    stock = pipe.decode_latents(latents).float().clamp(-1, 1)[0]
    torch.testing.assert_close(stock, ours, atol=2e-3, rtol=0)
    bare = generator.generate([GenerationRequest(req.prompt, seed=2)])[0]
    assert (bare - ours).abs().max() > 0.05


def test_lora_file_with_wrong_keys_is_a_clear_error(generator):
    from safetensors.torch import save

    model = generator.model
    bad = save({"transformer.blocks.0.nope.lora_A.weight": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="unexpected"):
        check_lora_file(bad, "bad.safetensors", model.config.layers, 1)


def test_artifact_save_load_roundtrip(generator, tmp_path):
    model = generator.model
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "video2lora.safetensors"]
    loaded = Video2LoRAModel.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v.cpu(), v2)


def test_video_encoder_blocks_roundtrip_and_see_frame_order(generator, tmp_path):
    from video2lora.config import Video2LoRAConfig

    config = Video2LoRAConfig.from_dict({**generator.model.config.to_dict(), "hyper": {"width": 32, "num_heads": 2,
                                                                                    "encoder_blocks": 2}})
    torch.manual_seed(0)
    model = Video2LoRAModel(config)
    with torch.no_grad():
        model.hypernet.head.weight.normal_(std=0.05)
    assert len(model.hypernet.encoder) == 2
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = Video2LoRAModel.from_pretrained(str(tmp_path / "ckpt"))
    latents = torch.randn(1, config.latent_channels, 3, 4, 4)
    torch.testing.assert_close(loaded.predict(latents)[0], model.predict(latents)[0], atol=0, rtol=0)
    # the same frames played backwards (a zoom in vs a zoom out) must give another LoRA
    backwards = model.predict(latents.flip(2))[0]
    assert (backwards - model.predict(latents)[0]).abs().max() > 1e-4


def test_lora_head_init_starts_at_zero_with_a_gradient_tiny_unchanged(tmp_path):
    """head_init "lora": the predicted LoRA is exactly zero, yet a loss on it sends a gradient to the head (B_pred's
    rows), so training does not start at the saddle of "tiny" (the default, unchanged), whose gradient is near zero."""
    from video2lora.config import HyperConfig, LoRAConfig, Video2LoRAConfig

    def build(**hyper):
        torch.manual_seed(0)
        return Video2LoRAModel(Video2LoRAConfig(
            lora=LoRAConfig(rank=2, down=8, up=6), layers=[(f"l{i}", 16, 12) for i in range(3)], latent_channels=4,
            hyper=HyperConfig(width=16, num_blocks=1, num_heads=2, iterations=2, **hyper)))

    g = torch.Generator().manual_seed(1)
    latents, targets = torch.randn(2, 4, 3, 4, 4, generator=g), [torch.randn(2, 12, 16, generator=g) for _ in range(3)]

    def deltas_and_head_grad(model):
        deltas = [lora.up @ lora.down for lora in model(latents)]  # (N, out, in): the weight update of each layer
        sum(((d - t) ** 2).mean() for d, t in zip(deltas, targets)).backward()
        return deltas, model.hypernet.head.weight.grad

    default, tiny, lora = build(), build(head_init="tiny"), build(head_init="lora")
    for (k, v), v2 in zip(default.state_dict().items(), tiny.state_dict().values()):
        assert torch.equal(v, v2), k  # "tiny" is the default, bit for bit
    d_tiny, g_tiny = deltas_and_head_grad(tiny)
    d_lora, g_lora = deltas_and_head_grad(lora)
    a_rows = 2 * 8  # the head's first rank * down outputs are A_pred
    assert all(torch.count_nonzero(d) == 0 for d in d_lora) and all(d.abs().max() > 0 for d in d_tiny)
    assert g_lora[a_rows:].abs().sum(1).min() > 0  # every B_pred row of the head learns from the first step
    assert torch.count_nonzero(g_lora[:a_rows]) == 0  # A_pred's rows follow once B_pred moves, as in LoRA
    assert g_tiny.norm() < 0.1 * g_lora.norm()  # tiny x tiny: the saddle
    # config.json round-trips the field, and one written before it existed loads as "tiny"
    lora.save_pretrained(str(tmp_path / "lora"))
    assert Video2LoRAModel.from_pretrained(str(tmp_path / "lora")).config.hyper.head_init == "lora"
    old = tiny.config.to_dict()
    del old["hyper"]["head_init"]
    assert Video2LoRAConfig.from_dict(old) == tiny.config
    with pytest.raises(ValueError, match="head_init"):
        HyperConfig(head_init="zeros")


def test_reference_features_read_motion_whatever_the_frames_look_like(tmp_path):
    """"frame_norm" and "correlation" do not move when every frame's channels are rescaled and shifted (a colour,
    brightness or contrast change, e.g. a fade), "correlation" peaks at the shift that carries a frame onto the next,
    and a model reading them round-trips through save/from_pretrained; the paper's "latent" stays the default."""
    from video2lora.config import HyperConfig, LoRAConfig, Video2LoRAConfig
    from video2lora.hypernet import frame_correlation, frame_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, 6, generator=g)
    scale, shift = torch.rand(2, 4, 5, 1, 1, generator=g) + 0.2, torch.randn(2, 4, 5, 1, 1, generator=g)
    torch.testing.assert_close(frame_norm(x * scale + shift), frame_norm(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(frame_correlation(x * scale + shift, 2), frame_correlation(x, 2), atol=1e-5, rtol=0)
    assert frame_correlation(x, 2).shape == (2, 25, 5, 6, 6) and frame_correlation(x, 2)[:, :, 0].abs().max() == 0
    # content moving one column right: position (y, x) of frame 1 is (y, x - 1) of frame 0, offset (0, -1)
    still = torch.randn(1, 4, 1, 8, 8, generator=g)
    moving = torch.cat([still, torch.roll(still, 1, dims=-1)], dim=2)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    peak = frame_correlation(moving, 1)[0, :, 1, 2:6, 2:6].mean((1, 2)).argmax()
    assert offsets[peak] == (0, -1)

    def build(**hyper):
        torch.manual_seed(0)
        return Video2LoRAModel(Video2LoRAConfig(
            lora=LoRAConfig(rank=2, down=8, up=6), layers=[(f"l{i}", 16, 12) for i in range(2)], latent_channels=4,
            hyper=HyperConfig(width=16, num_blocks=1, num_heads=2, iterations=2, stem_channels=8, **hyper)))

    assert HyperConfig().reference_features == ("latent",)
    model = build(reference_features=["frame_norm", "correlation"])
    latents = torch.randn(1, 4, 5, 6, 6, generator=g)
    # the stem reads 4 standardised channels and 25 correlations, and the LoRA ignores a fade of the reference
    assert model.hypernet.stem[0].in_channels == 4 + 25
    torch.testing.assert_close(model.predict(latents * 0.3 + 1.0)[0], model.predict(latents)[0], atol=1e-4, rtol=0)
    assert (model.predict(latents.flip(2))[0] - model.predict(latents)[0]).abs().max() > 1e-4
    model.save_pretrained(str(tmp_path / "features"))
    loaded = Video2LoRAModel.from_pretrained(str(tmp_path / "features"))
    assert loaded.config.hyper.reference_features == ("frame_norm", "correlation")
    torch.testing.assert_close(loaded.predict(latents)[0], model.predict(latents)[0], atol=0, rtol=0)
    # a model reading the latent writes its config.json as before the fields existed (the same bytes, so the same
    # checkpoint identity), and such a file builds the same model
    paper = build()
    paper.save_pretrained(str(tmp_path / "paper"))
    saved = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert not {"reference_features", "correlation_radius"} & set(saved["hyper"])
    again = Video2LoRAModel.from_pretrained(str(tmp_path / "paper"))
    assert again.hypernet.stem[0].in_channels == 4
    torch.testing.assert_close(again.predict(latents)[0], paper.predict(latents)[0], atol=0, rtol=0)
    for bad in (["optical_flow"], [], ["latent", "latent"], "frame_norm", None):
        with pytest.raises(ValueError, match="reference_features"):
            HyperConfig(reference_features=bad)
    for bad in (2.0, True, "2", -1, 9):
        with pytest.raises(ValueError, match="correlation_radius"):
            HyperConfig(correlation_radius=bad)
    # bf16 weights: the features are computed in float32 (no NaN for a flat frame), then cast
    flat = torch.zeros(1, 4, 3, 6, 6)
    assert torch.isfinite(model.to(torch.bfloat16).hypernet.reference_features(flat.to(torch.bfloat16)).float()).all()


def test_motion_stream_predicts_the_motion_half_from_a_reference_whose_look_is_randomised(tmp_path):
    """hyper.motion_stream: two hypernetworks, the first half of the rank from a reference whose look is randomised
    in training only (`randomise_look`: channels mixed, frames blurred or pixelated, no content moved between
    frames), the second from the reference as it is; deterministic under a generator, and saved like any model."""
    from video2lora.config import HyperConfig, LoRAConfig, Video2LoRAConfig
    from video2lora.hypernet import HyperNetwork, MotionLookHyperNetwork, randomise_look

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, 6, generator=g)
    y = randomise_look(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and torch.equal(y, randomise_look(x, torch.Generator().manual_seed(1)))
    assert (y - x).abs().max() > 0.1
    dot = torch.zeros(1, 4, 5, 6, 6)
    dot[0, :, 2, 3, 3] = 1.0  # one position of one frame: it stays in its frame, near where it was (blur, then 2x2)
    for seed in range(4):
        spread = randomise_look(dot, torch.Generator().manual_seed(seed)).abs().sum(1)[0]  # (F, h, w)
        assert spread[[0, 1, 3, 4]].max() == 0 and spread[2].sum() > 0  # never into another frame
        assert torch.isclose(spread[2, 2:6, 2:6].sum(), spread[2].sum())

    def build(**hyper):
        torch.manual_seed(0)
        return Video2LoRAModel(Video2LoRAConfig(
            lora=LoRAConfig(rank=2, down=8, up=6), layers=[(f"l{i}", 16, 12) for i in range(2)], latent_channels=4,
            hyper=HyperConfig(width=16, num_blocks=1, num_heads=2, iterations=2, head_init_std=0.05, **hyper)))

    model = build(motion_stream=True)
    assert isinstance(model.hypernet, MotionLookHyperNetwork) and isinstance(build().hypernet, HyperNetwork)
    assert model.hypernet.motion.head.out_features == 8 + 6  # each stream predicts rank 1
    a, b = model.eval().predict(x)
    assert a.shape == (2, 2, 2, 8) and b.shape == (2, 2, 6, 2)
    assert torch.equal(model.predict(x)[0], a)  # eval: nothing random
    a_train, b_train = model.train().predict(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a_train[:, :, 1], a[:, :, 1], atol=0, rtol=0)  # the look half reads x as it is
    torch.testing.assert_close(b_train[..., 1], b[..., 1], atol=0, rtol=0)
    assert (a_train[:, :, 0] - a[:, :, 0]).abs().max() > 1e-6  # the motion half read a randomised look
    again = model.predict(x, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(again, a_train, atol=0, rtol=0)  # the generator decides the randomisation
    model.eval().save_pretrained(str(tmp_path / "ms"))
    assert json.loads((tmp_path / "ms" / "config.json").read_text())["hyper"]["motion_stream"] is True
    loaded = Video2LoRAModel.from_pretrained(str(tmp_path / "ms"))
    torch.testing.assert_close(loaded.predict(x)[0], a, atol=0, rtol=0)
    build().save_pretrained(str(tmp_path / "one"))  # off: config.json as before the field existed
    assert "motion_stream" not in json.loads((tmp_path / "one" / "config.json").read_text())["hyper"]
    with pytest.raises(ValueError, match="rank 3 is odd"):
        Video2LoRAModel(Video2LoRAConfig(lora=LoRAConfig(rank=3, down=8, up=6), layers=[("l0", 16, 12)],
                                         latent_channels=4, hyper=HyperConfig(width=16, num_heads=2, motion_stream=True)))
    with pytest.raises(ValueError, match="motion_stream"):
        HyperConfig(motion_stream="yes")


def test_pickle_checkpoint_is_refused(generator, tmp_path):
    model = generator.model
    model.save_pretrained(str(tmp_path / "ckpt"))
    torch.save(model.state_dict(), tmp_path / "ckpt" / "video2lora.safetensors")  # a pickle in disguise
    with pytest.raises(ValueError, match="never unpickle"):
        Video2LoRAModel.from_pretrained(str(tmp_path / "ckpt"))


def test_i2v_backbone_generates_from_first_frame(tiny_i2v_backbone_dir):
    backbone = Backbone.from_pretrained(tiny_i2v_backbone_dir, device="cpu")
    gen = Video2LoRAGenerator(backbone, make_model(backbone), GEN)
    ref, image = random_clips(1, seed=8)[0], random_clips(1, seed=9)[0][:, 0]
    v = gen.generate([GenerationRequest("a red circle", reference=ref, image=image, seed=1),
                      GenerationRequest("a red circle", image=image, seed=1)])
    assert v[0].shape == (3, 9, 32, 32) and (v[0] - v[1]).abs().max() > 0.05
    with pytest.raises(ValueError, match="first frame"):
        gen.backbone.sample_latents(["x"], [""], [torch.Generator()], 9, 32, 32, 2, 6.0, None)


def test_sizes_the_model_cannot_make_are_rejected(generator):
    with pytest.raises(ValueError, match="num_frames"):
        generator.generate([GenerationRequest("x")], num_frames=10)
    with pytest.raises(ValueError, match="multiple"):
        generator.generate([GenerationRequest("x")], height=36)


def test_size_report_from_published_configs(capsys):
    from video2lora.size import main, size_report

    r = size_report("cogvideox-5b")
    assert r["adapted_layers"] == 168
    assert r["lora_floats"] == 168 * 150
    assert 1.0e6 < r["hypernetwork_params"] < 2.0e6  # "about 1.5 M parameters"
    assert r["aux_params"] == 168 * (100 * 3072 + 3072 * 50)
    main(["cogvideox-5b"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "MB" in last and "KB" in last


def test_default_checkpoint_is_one_per_backbone_and_says_it_is_untrained(tiny_backbone_dir, tiny_i2v_backbone_dir,
                                                                         tmp_path, monkeypatch, caplog):
    """With no --checkpoint for a backbone other than the bundled one, each backbone shape gets its own seeded
    untrained checkpoint (one made for another backbone's layers is never reused), and every run says so."""
    import logging

    from pipelines import defaults
    from video2lora.hypernet import Video2LoRAModel

    monkeypatch.setenv("VIDEO2LORA_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipelines.defaults"):
        t2v = defaults.default_checkpoint(tiny_backbone_dir)
        i2v = defaults.default_checkpoint(tiny_i2v_backbone_dir)
        again = defaults.default_checkpoint(tiny_backbone_dir)
    assert t2v == again != i2v and os.path.dirname(t2v) == str(tmp_path)
    assert sum("untrained seeded hypernetwork" in r.getMessage() for r in caplog.records) == 3
    for backbone, ckpt in ((tiny_backbone_dir, t2v), (tiny_i2v_backbone_dir, i2v)):
        Video2LoRAGenerator.from_pretrained(backbone, ckpt, device="cpu")  # its layers fit that backbone
    first = Video2LoRAModel.from_pretrained(t2v).state_dict()
    import shutil

    shutil.rmtree(t2v)  # made again (another machine): seeded, the same weights
    remade = Video2LoRAModel.from_pretrained(defaults.default_checkpoint(tiny_backbone_dir)).state_dict()
    assert first.keys() == remade.keys() and all(torch.equal(first[k], remade[k]) for k in first)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # made atomically, nothing left behind
