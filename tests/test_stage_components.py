"""Each stage holds only what it uses: asserted on the tiny models, and reported at full size from the published
configs on the meta device."""

import pytest
import torch
from conftest import save_model_for


def parameter_ids(*modules):
    return {id(p) for m in modules for p in m.parameters()}


def test_lora_predictor_holds_the_vae_encoder_and_the_hypernetwork_only(tiny_i2v_backbone_dir, tmp_path):
    from video2lora.backbones import Backbone
    from video2lora.generate import Video2LoRAGenerator
    from video2lora.predict import LoRAPredictor

    ckpt = save_model_for(tiny_i2v_backbone_dir, str(tmp_path / "ckpt"))
    predictor = LoRAPredictor.from_pretrained(tiny_i2v_backbone_dir, ckpt, device="cpu")
    assert list(predictor.backbone.modules()) == ["vae"]  # no transformer, no text encoder
    assert predictor.backbone.pipe.tokenizer is None and predictor.backbone.vae.decoder is None
    assert list(predictor.modules()) == ["vae.encoder", "hypernetwork"]
    resident = {id(p) for obj in (predictor.backbone.vae, predictor.hypernet) for p in obj.parameters()}
    assert resident == parameter_ids(*predictor.modules().values())  # nothing else (no aux matrices)

    full = Backbone.from_pretrained(tiny_i2v_backbone_dir, device="cpu")
    assert sum(p.numel() for p in predictor.backbone.vae.parameters()) == sum(p.numel() for p in full.vae.encoder.parameters())
    generator = Video2LoRAGenerator.from_pretrained(tiny_i2v_backbone_dir, ckpt, device="cpu")
    refs = [torch.rand(3, 9, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    for ours, theirs in zip(predictor.predict_loras(refs, batch_size=2), generator.predict_loras(refs, batch_size=2)):
        assert torch.equal(ours.a_pred, theirs.a_pred) and torch.equal(ours.b_pred, theirs.b_pred)


def test_training_backbone_holds_the_dit_only(tiny_i2v_backbone_dir):
    from video2lora.backbones import Backbone

    full = Backbone.from_pretrained(tiny_i2v_backbone_dir, device="cpu")
    dit = Backbone.from_pretrained(tiny_i2v_backbone_dir, device="cpu", components=("transformer",))
    assert list(dit.modules()) == ["transformer"] and dit.pipe.tokenizer is None
    # what the loss needs of the VAE comes from its config: the same latent width, grid and layers
    assert (dit.pipe.vae_scale_factor_spatial, dit.pipe.vae_scale_factor_temporal) == (
        full.pipe.vae_scale_factor_spatial, full.pipe.vae_scale_factor_temporal)
    assert dit.latent_channels == full.latent_channels and dit.lora_layers() == full.lora_layers()
    lat = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    image = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = full.encode_prompts(["a red circle", "a cat"])
    losses = [b.training_loss(lat, text, image, generator=torch.Generator().manual_seed(2)) for b in (full, dit)]
    torch.testing.assert_close(losses[1], losses[0])


def test_stage_report_at_full_size():
    from video2lora.stage_sizes import stage_report

    rows = {r["stage"]: r for r in stage_report("cogvideox-5b", workers=8)}
    assert rows["hypernetwork"]["holds"] == ["vae.encoder", "hypernetwork"]
    assert rows["generation"]["holds"] == ["text_encoder", "transformer", "vae", "aux"]
    assert rows["training"]["holds"] == ["transformer", "hypernetwork", "aux"]
    assert rows["hypernetwork"]["params"] < 0.1e9  # 92 M of VAE encoder + 1.6 M of hypernetwork
    assert 10.5e9 < rows["generation"]["params"] < 10.8e9  # T5-XXL 4.76 B + DiT 5.57 B + VAE 0.22 B + aux 0.08 B
    assert all(r["fits_80gb"] for r in rows.values())
    assert 11e9 < rows["training"]["resident_bytes"] < 12e9  # the bf16 DiT, the trainable parts' ZeRO-2 share


def test_generation_stage_holds_text_encoder_dit_vae_and_aux(tiny_i2v_backbone_dir, tmp_path):
    from video2lora.generate import GenerationRequest, Video2LoRAGenerator

    ckpt = save_model_for(tiny_i2v_backbone_dir, str(tmp_path / "ckpt"))
    generator = Video2LoRAGenerator.from_pretrained(tiny_i2v_backbone_dir, ckpt, device="cpu")
    lora = generator.predict_loras([torch.rand(3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1])[0]
    generator.release_hypernetwork()  # what pipelines/stages.py GenerateStage does
    assert list(generator.modules()) == ["transformer", "text_encoder", "vae", "aux"]
    image = torch.zeros(3, 32, 32)
    video = generator.generate([GenerationRequest(
        "a red circle", lora=lora, image=image, seed=0)], num_frames=9, height=32, width=32, steps=2)[0]  # still applies a predicted LoRA
    assert video.shape == (3, 9, 32, 32)
    with pytest.raises(ValueError, match="no hypernetwork loaded"):
        generator.predict_loras([torch.zeros(3, 9, 32, 32)])
