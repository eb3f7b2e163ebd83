"""The library on the tiny Wan2.1 text-to-video backbone: loading, generation, export, training loss."""

import dataclasses
import json

import pytest
import torch
from conftest import make_model, random_clips

from video2lora.backbones import Backbone
from video2lora.config import GenerationConfig
from video2lora.export import check_lora_file, export_lora_bytes
from video2lora.generate import GenerationRequest, Video2LoRAGenerator, new_model_for
from video2lora.lightlora import inject_lightlora, per_sample_loras, remove_lightlora

# the paper's sampler exactly (no step cache): these tests compare against the stock diffusers pipeline
GEN = GenerationConfig(num_frames=9, height=32, width=32, steps=3, guidance_scale=6.0, step_cache="none")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from video2lora.presets import save_preset

    return save_preset("tiny-wan", str(tmp_path_factory.mktemp("tiny-wan")), seed=0)


@pytest.fixture(scope="module")
def generator(wan_dir):
    backbone = Backbone.from_pretrained(wan_dir, device="cpu")
    return Video2LoRAGenerator(backbone, make_model(backbone), GEN)


def test_tiny_wan_saves_and_loads_through_from_pretrained(wan_dir):
    from transformers import AutoTokenizer

    from video2lora.backbones.wan import WanBackbone

    with open(f"{wan_dir}/model_index.json") as f:
        assert json.load(f)["_class_name"] == "WanPipeline"
    backbone = Backbone.from_pretrained(wan_dir, device="cpu")
    assert isinstance(backbone, WanBackbone) and backbone.kind == "wan" and not backbone.is_i2v
    assert backbone.dtype == torch.float32 and backbone.device.type == "cpu"
    assert (backbone.vae_scale_spatial, backbone.vae_scale_temporal, backbone.patch_size) == (8, 4, 2)
    assert backbone.latent_channels == 4 and backbone.max_text_len == 16
    tok = AutoTokenizer.from_pretrained(f"{wan_dir}/tokenizer")  # what WanPipeline declares
    assert tok("a red circle").input_ids == backbone.pipe.tokenizer("a red circle").input_ids
    # seeded: the same preset twice has the same weights
    again = Backbone.from_pretrained(wan_dir, device="cpu")
    for (k, v), (_, v2) in zip(backbone.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(v, v2), k


def test_lora_layers_are_self_attention_of_every_block(generator):
    layers = generator.backbone.lora_layers()
    n = generator.backbone.transformer.config.num_layers
    assert [name for name, _, _ in layers] == [
        f"blocks.{i}.attn1.{p}" for i in range(n) for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    assert all((i, o) == (32, 32) for _, i, o in layers)


def test_encode_decode_shapes_and_normalisation(generator):
    bb = generator.backbone
    clip = random_clips(2, seed=3)
    x = torch.stack(clip)
    latents = bb.encode_video(x)
    assert latents.shape == (2, 4, 3, 4, 4)
    assert torch.equal(latents, bb.encode_video(x))  # the mean: deterministic
    raw = bb.vae.encode(x).latent_dist.mode()
    cfg = bb.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    video = bb.decode(latents)
    assert video.shape == (2, 3, 9, 32, 32) and video.min() >= -1 and video.max() <= 1
    embeds = bb.encode_prompts(["a red circle", "a blue square"])
    assert embeds.shape == (2, 16, 32)


def test_batch_of_mixed_loras_equals_each_row_alone(generator):
    refs = random_clips(3, seed=1)
    reqs = [GenerationRequest(p, reference=r, seed=s) for p, r, s in
            zip(["a red circle", "a blue square", "a green ring"], refs, [1, 2, 3])]
    reqs[2].reference = None  # a row without LoRA in the same batch
    batch = generator.generate(reqs)
    for req, video in zip(reqs, batch):
        alone = generator.generate([GenerationRequest(req.prompt, reference=req.reference, seed=req.seed)])[0]
        assert video.shape == (3, 9, 32, 32)
        torch.testing.assert_close(video, alone, atol=5e-3, rtol=0)
    bare = generator.generate([GenerationRequest(reqs[0].prompt, seed=1)])[0]
    assert (bare - batch[0]).abs().max() > 0.05  # the LoRA changes the video
    assert torch.equal(generator.generate([GenerationRequest(reqs[0].prompt, seed=1)])[0], bare)  # seeded


def test_strength_zero_equals_backbone(generator):
    ref = random_clips(1, seed=4)[0]
    bare = generator.generate([GenerationRequest("a red circle", seed=5)])[0]
    zero = generator.generate([GenerationRequest("a red circle", reference=ref, seed=5, lora_strength=0.0)])[0]
    assert torch.equal(bare, zero)


def test_exported_lora_with_stock_wan_pipeline_gives_same_video(generator, wan_dir, tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    ref = random_clips(1, seed=7)[0]
    req = GenerationRequest("a blue square", reference=ref, seed=2, lora_strength=0.7)
    ours = generator.generate([req])[0]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    model = generator.model
    path.write_bytes(export_lora_bytes(model, req.lora.a_pred, req.lora.b_pred, strength=0.7))
    check_lora_file(path.read_bytes(), str(path), model.config.layers, model.config.lora.rank)
    pipe = DiffusionPipeline.from_pretrained(wan_dir)
    assert isinstance(pipe, WanPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    video = pipe(prompt=[req.prompt], negative_prompt=[""], num_frames=9, height=32, width=32,
                 num_inference_steps=GEN.steps, guidance_scale=GEN.guidance_scale,
                 generator=[torch.Generator().manual_seed(2)], output_type="np",
                 max_sequence_length=16, return_dict=False)[0]  # (B, F, H, W, 3) in [0, 1]
    stock = torch.from_numpy(video[0]).permute(3, 0, 1, 2) * 2 - 1
    torch.testing.assert_close(stock, ours, atol=2e-3, rtol=0)
    bare = generator.generate([GenerationRequest(req.prompt, seed=2)])[0]
    assert (bare - ours).abs().max() > 0.05


def test_training_loss_is_per_sample_and_trains_the_hypernetwork(wan_dir):
    backbone = Backbone.from_pretrained(wan_dir, device="cpu")
    model = new_model_for(backbone, seed=0)
    names = inject_lightlora(backbone.transformer, model.config.lora.target_modules)
    try:
        latents = backbone.encode_video(torch.stack(random_clips(2, seed=11)))
        embeds = backbone.encode_prompts(["a red circle", "a blue square"])
        loras = model(latents.float())
        with per_sample_loras(backbone.transformer, names, loras, torch.ones(2)):
            loss = backbone.training_loss(latents, embeds, generator=torch.Generator().manual_seed(0))
        assert loss.shape == (2,) and torch.isfinite(loss).all() and (loss > 0).all()
        loss.mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
        assert all(p.grad is None for p in backbone.transformer.parameters())  # the backbone stays frozen
        # same generator -> same loss; each row depends only on its own sample
        with torch.no_grad(), per_sample_loras(backbone.transformer, names, model(latents.float()), torch.ones(2)):
            again = backbone.training_loss(latents, embeds, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(again, loss.detach())
    finally:
        remove_lightlora(backbone.transformer)


def test_training_loss_is_flow_matching(wan_dir):
    """sigma ~ U(0,1), x_t = (1 - sigma) x0 + sigma noise, target noise - x0, timestep 1000 sigma."""
    backbone = Backbone.from_pretrained(wan_dir, device="cpu")
    latents = backbone.encode_video(torch.stack(random_clips(1, seed=12)))
    embeds = backbone.encode_prompts(["a red circle"])
    loss = backbone.training_loss(latents, embeds, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = torch.rand((1,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        pred = backbone.transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                    return_dict=False)[0]
    torch.testing.assert_close(loss, ((pred - (noise - latents)) ** 2).flatten(1).mean(1))


def test_sizes_the_model_cannot_make_are_rejected(generator):
    generator.backbone.check_size(9, 32, 48)
    with pytest.raises(ValueError, match="num_frames"):
        generator.generate([GenerationRequest("x")], num_frames=10)
    with pytest.raises(ValueError, match="multiple of 16"):
        generator.generate([GenerationRequest("x")], height=40)


def test_i2v_is_a_clear_error(generator):
    from video2lora.backbones.wan import WanBackbone

    with pytest.raises(NotImplementedError, match="image-to-video"):
        WanBackbone(generator.backbone.pipe, "wan-i2v")
    with pytest.raises(NotImplementedError, match="first frames"):
        generator.backbone.sample_latents(["x"], [""], [torch.Generator()], 9, 32, 32, 2, 6.0, torch.zeros(1, 3, 32, 32))


def test_magcache_with_separate_cfg_calls(wan_dir):
    """Wan runs the conditional and unconditional rows as two DiT calls (two cache contexts, each calibrated):
    magcache skips steps of both, and a batch of mixed LoRAs still equals each row alone."""
    backbone = Backbone.from_pretrained(wan_dir, device="cpu")
    gen = Video2LoRAGenerator(backbone, make_model(backbone), dataclasses.replace(
        GEN, steps=6, step_cache="magcache", step_cache_threshold=2.0, step_cache_interval=3))
    calls = {"n": 0}
    backbone.transformer.blocks[0].attn1.to_q.base.register_forward_pre_hook(
        lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    refs = random_clips(2, seed=1)
    reqs = [GenerationRequest(p, reference=r, seed=s) for p, r, s in zip(["a red circle", "a blue square"], refs, [1, 2])]
    batch = gen.generate(reqs)
    first, calls["n"] = calls["n"], 0
    ratios = gen.step_cost.mag_ratios[(6, GEN.guidance_scale, 9, 32, 32)]
    assert len(ratios) == 6 and ratios[0] == 1.0
    for req, video in zip(reqs, batch):
        alone = gen.generate([req])[0]
        torch.testing.assert_close(video, alone, atol=5e-3, rtol=0)
    per_video = calls["n"] // 2
    assert 0 < per_video < 2 * 6  # some steps skipped
    assert first == 2 * 6 + per_video  # the calibration pass (every step, both CFG calls), then the batch
