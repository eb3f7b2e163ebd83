import copy

import pytest
import torch
from torch import nn

from video2lora.config import LoRAConfig, Video2LoRAConfig
from video2lora.hypernet import Video2LoRAModel
from video2lora.lightlora import (
    LightLoRALinear,
    inject_lightlora,
    per_sample_loras,
    remove_lightlora,
)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(d, d)
        self.attn1.to_k = nn.Linear(d, d)
        self.attn1.to_v = nn.Linear(d, d)
        self.attn1.to_out = nn.ModuleList([nn.Linear(d, 2 * d), nn.Dropout(0.0)])
        self.ff = nn.Linear(2 * d, d)

    def forward(self, x):
        a = self.attn1
        return self.ff(a.to_out[0](a.to_q(x) * torch.sigmoid(a.to_k(x)) + a.to_v(x)))


class ToyDiT(nn.Module):
    def __init__(self, d=24, n=2):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.transformer_blocks:
            x = x + b(x)
        return x


def setup(num_samples=3, seed=0):
    torch.manual_seed(seed)
    dit = ToyDiT()
    names = inject_lightlora(dit, LoRAConfig().target_modules)
    layers = [(n, dit.get_submodule(n).in_features, dit.get_submodule(n).out_features) for n in names]
    model = Video2LoRAModel(Video2LoRAConfig(layers=layers, latent_channels=4))
    a = torch.randn(num_samples, len(layers), 1, 100) * 0.1
    b = torch.randn(num_samples, len(layers), 50, 1) * 0.1
    return dit, names, model, a, b


def test_injects_q_k_v_out_of_every_block():
    dit, names, *_ = setup()
    assert len(names) == 8
    assert names[3] == "transformer_blocks.0.attn1.to_out.0"
    assert all(isinstance(dit.get_submodule(n), LightLoRALinear) for n in names)
    assert not isinstance(dit.get_submodule("transformer_blocks.0.ff"), LightLoRALinear)


def test_per_sample_batch_equals_each_sample_alone():
    dit, names, model, a, b = setup()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        loras = model.materialize(a, b)
        with per_sample_loras(dit, names, loras, torch.tensor([1.0, 0.5, 2.0])):
            batched = dit(x)
        for i, s in enumerate([1.0, 0.5, 2.0]):
            single_loras = model.materialize(a[i : i + 1], b[i : i + 1])
            with per_sample_loras(dit, names, single_loras, torch.tensor([s])):
                alone = dit(x[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    # the LoRAs really differ per sample, so the check above is not vacuous
    with torch.no_grad(), per_sample_loras(dit, names, model.materialize(a[:1], b[:1]), torch.tensor([0.5])):
        other_lora = dit(x[1:2])
    assert not torch.allclose(other_lora, batched[1:2], atol=1e-4)


def test_strength_zero_and_no_lora_equal_base_exactly():
    dit, names, model, a, b = setup()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        base = dit(x)
        with per_sample_loras(dit, names, model.materialize(a, b), torch.tensor([0.0, 1.0, 0.0])):
            out = dit(x)
        with per_sample_loras(dit, names, model.materialize(a, b), torch.zeros(3)):
            all_zero = dit(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1])
    assert torch.equal(all_zero, base)
    assert torch.equal(dit(x), base)  # context left the model bare


def test_cfg_batch_repeats_samples():
    dit, names, model, a, b = setup(num_samples=2)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        loras = model.materialize(a, b)
        with per_sample_loras(dit, names, loras, torch.ones(2)):
            cfg = dit(torch.cat([x, x]))  # [uncond..., cond...] as diffusers stacks them
            plain = dit(x)
    torch.testing.assert_close(cfg[:2], plain)
    torch.testing.assert_close(cfg[2:], plain)
    with pytest.raises(ValueError, match="does not repeat"):
        with per_sample_loras(dit, names, loras, torch.ones(2)):
            dit(torch.randn(3, 5, 24))


def test_inject_remove_roundtrip_restores_modules_exactly():
    torch.manual_seed(0)
    dit = ToyDiT()
    before = copy.deepcopy(dit.state_dict())
    originals = {n: m for n, m in dit.named_modules()}
    inject_lightlora(dit, LoRAConfig().target_modules)
    inject_lightlora(dit, LoRAConfig().target_modules)  # idempotent
    assert remove_lightlora(dit) == 8
    after = dit.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for n, m in dit.named_modules():
        assert m is originals[n]


def test_gradients_reach_only_hypernetwork_and_aux():
    dit, names, model, _, _ = setup()
    dit.requires_grad_(False)
    latents = torch.randn(2, 4, 3, 8, 8)
    with torch.no_grad():  # untrained tiny head gives near-zero LoRAs; make it non-trivial
        model.hypernet.head.weight.normal_(0, 0.05)
    loras = model(latents)
    with per_sample_loras(dit, names, loras, torch.ones(2)):
        loss = dit(torch.randn(2, 5, 24)).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in dit.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.a_aux)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.b_aux)
    assert model.hypernet.head.weight.grad.abs().sum() > 0
    assert model.hypernet.video_proj.weight.grad.abs().sum() > 0


def test_shape_mismatch_is_a_clear_error():
    dit, names, model, a, b = setup()
    loras = model.materialize(a, b)
    loras[0] = type(loras[0])(loras[0].down[..., :5], loras[0].up)
    with pytest.raises(ValueError, match="do not fit"):
        with per_sample_loras(dit, names, loras, torch.ones(3)):
            pass
