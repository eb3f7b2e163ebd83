"""Activation checkpointing of the frozen DiT's blocks: the same loss and gradients, with the blocks recomputed."""

import pytest
import torch

from conftest import make_model


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    from video2lora.backbones import Backbone

    return Backbone.from_pretrained(tiny_backbone_dir, device="cpu", dtype=torch.float32)


def loss_and_grads(model, backbone, batch, checkpointing: bool):
    from video2lora.lightlora import LightLoRALinear
    from video2lora.training import prepare_backbone, training_step

    prepare_backbone(backbone, model, activation_checkpointing=checkpointing)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in backbone.transformer.modules()
             if isinstance(m, LightLoRALinear)]
    model.zero_grad(set_to_none=True)
    loss = training_step(model, backbone, batch, torch.Generator().manual_seed(7))
    forward_calls = len(calls)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, forward_calls, len(calls) - forward_calls


def test_gradients_equal_with_and_without_activation_checkpointing(backbone):
    model = make_model(backbone)
    g = torch.Generator().manual_seed(0)
    lat = backbone.encode_video(torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1)
    batch = {"latents": lat, "ref_latents": lat.flip(0), "prompt_embeds": backbone.encode_prompts(["a red circle", "a cat"])}
    loss0, grads0, fwd0, recomputed0 = loss_and_grads(model, backbone, batch, checkpointing=False)
    loss1, grads1, fwd1, recomputed1 = loss_and_grads(model, backbone, batch, checkpointing=True)
    assert recomputed0 == 0 and fwd1 == fwd0 and recomputed1 == fwd0  # every adapted layer ran again in backward
    assert loss1 == loss0
    assert grads0.keys() == grads1.keys() and grads0  # gradients reach the hypernetwork and the aux matrices
    assert any(k.startswith("hypernet.") for k in grads0) and any(not k.startswith("hypernet.") for k in grads0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-7)
        assert grads0[k].abs().sum() > 0, k
    assert not any(p.requires_grad for p in backbone.transformer.parameters())  # the DiT stays frozen


def test_checkpointing_is_on_by_default_only_for_large_dits(backbone, monkeypatch):
    from video2lora.training import loss as loss_mod
    from video2lora.training import prepare_backbone

    model = make_model(backbone)
    backbone.enable_activation_checkpointing(False)
    prepare_backbone(backbone, model)
    assert not backbone.transformer.gradient_checkpointing  # the tiny DiT: off
    monkeypatch.setattr(loss_mod, "ACTIVATION_CHECKPOINTING_ABOVE", backbone.num_parameters - 1)
    prepare_backbone(backbone, model)
    assert backbone.transformer.gradient_checkpointing  # above the threshold: on
    backbone.enable_activation_checkpointing(False)
