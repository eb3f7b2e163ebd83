"""Cheaper steps with per-sample LoRAs (video2lora/backbones/step_cost.py): under every step cache, fused q/k/v
projections and compiled blocks, a batch of rows with different LoRAs (CFG on) is each row alone under the same
option, strength 0 is the bare backbone under that option, and the option does change the computation."""

import dataclasses

import pytest
import torch
from conftest import make_model, random_clips

from video2lora.backbones import Backbone
from video2lora.backbones.step_cost import STEP_CACHES
from video2lora.config import GenerationConfig
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.lightlora import FusedLightLoRALinear, LayerLoRA, LightLoRALinear

# 4 DDIM steps (timesteps 999, 749, 499, 249): steps 2-4 lie in the cache window, so every cache reuses something
GEN = GenerationConfig(num_frames=9, height=32, width=32, steps=4, guidance_scale=6.0, step_cache="none",
                       step_cache_interval=2, step_cache_timesteps=(100, 800))
PROMPTS = ["a red circle", "a blue square", "a green ring"]


def make_generator(backbone_dir, **options) -> Video2LoRAGenerator:
    """A float64 backbone (the hypernetwork stays float32): in float32, batched and batch-of-one reductions differ
    in the last bits, and 4 steps of CFG 6 on a random tiny DiT amplify that to about 1 % of a LoRA's effect on
    some CPUs, which would leave a row mix-up check no margin; in float64 what is left is the float32 factors'
    last bits, about 1e-4 of it."""
    backbone = Backbone.from_pretrained(backbone_dir, device="cpu", dtype=torch.float64)
    return Video2LoRAGenerator(backbone, make_model(backbone), dataclasses.replace(GEN, **options))


def count_attention(generator) -> dict:
    """Counts the self-attention projections each block actually computes (a cached step skips them)."""
    counts = {"q": 0}
    for block in generator.backbone.transformer.transformer_blocks:
        block.attn1.to_q.base.register_forward_pre_hook(lambda m, a: counts.__setitem__("q", counts["q"] + 1))
    return counts


def check_mixed_batch(generator):
    """The test_model.py mixed-batch check under the generator's options: a batch of two LoRA rows and a bare one
    equals each row alone, to within 1e-3 of a LoRA's effect on average (measured: at most 8e-5 over every option)
    and 3e-2 at the worst pixel (measured: 3e-3); the row with its neighbour's LoRA is about one effect away."""
    refs = random_clips(2, seed=1) + [None]
    reqs = [GenerationRequest(p, reference=r, seed=s) for p, r, s in zip(PROMPTS, refs, [1, 2, 3])]
    batch = generator.generate(reqs)
    for req, video in zip(reqs, batch):
        bare = generator.generate([GenerationRequest(req.prompt, seed=req.seed)])[0]
        if req.reference is None:
            torch.testing.assert_close(video, bare, atol=1e-4, rtol=0)
            continue
        alone = generator.generate([GenerationRequest(req.prompt, reference=req.reference, seed=req.seed)])[0]
        effect, error = (bare - alone).abs(), (video - alone).abs()
        assert effect.mean() > 0.05
        assert error.mean() < 1e-3 * effect.mean(), (error.mean(), effect.mean())
        assert error.max() < 3e-2 * effect.max(), (error.max(), effect.max())
        neighbour = next(r.reference for r in reqs if r.reference is not None and r is not req)
        swapped = generator.generate([GenerationRequest(req.prompt, reference=neighbour, seed=req.seed)])[0]
        assert (swapped - alone).abs().mean() > 0.3 * effect.mean()  # the bound above tells rows apart
        # strength 0 under the same option is the bare backbone, bit for bit
        zero = generator.generate([GenerationRequest(req.prompt, reference=req.reference, seed=req.seed,
                                                     lora_strength=0.0)])[0]
        assert torch.equal(zero, bare)
    return batch


@pytest.mark.parametrize("cache", [c for c in STEP_CACHES if c != "none"])
def test_each_cache_keeps_rows_apart_and_skips_work(tiny_backbone_dir, cache):
    plain = make_generator(tiny_backbone_dir)
    # threshold 1.0: the random tiny DiT changes fast from step to step; with it first_block skips 2 of its 8 block
    # calls and magcache 2 of its 4 steps
    cached = make_generator(tiny_backbone_dir, step_cache=cache, step_cache_threshold=1.0)
    counts = {name: count_attention(g) for name, g in (("plain", plain), ("cached", cached))}
    req = [GenerationRequest("a red circle", reference=random_clips(1, seed=1)[0], seed=1)]
    if cache == "magcache":  # its first call also runs the calibration pass (one bare video, nothing skipped)
        cached.generate(req)
        counts["cached"]["q"] = 0
    base, fast = plain.generate(req)[0], cached.generate(req)[0]
    blocks = len(plain.backbone.transformer.transformer_blocks)
    assert counts["plain"]["q"] == GEN.steps * blocks
    assert counts["cached"]["q"] < counts["plain"]["q"], cache  # the cache did skip attention
    assert not torch.equal(base, fast)  # ... and so changed the video (how much is measured, not tested)
    check_mixed_batch(cached)


def test_fused_qkv_layer_equals_three_layers():
    """One base GEMM + one down-projection over concatenated factors + block-diagonal up = q, k, v one by one."""
    torch.manual_seed(0)
    width, rank, loras = 24, 2, 3
    parts = [LightLoRALinear(torch.nn.Linear(width, width)) for _ in range(3)]
    fused_base = torch.nn.Linear(width, 3 * width)
    with torch.no_grad():
        fused_base.weight.copy_(torch.cat([p.base.weight for p in parts]))
        fused_base.bias.copy_(torch.cat([p.base.bias for p in parts]))
    fused = FusedLightLoRALinear(fused_base, tuple(parts))
    strengths = torch.tensor([1.0, 0.0, 0.7])  # a strength-0 row among them
    for p in parts:
        p.lora = LayerLoRA(torch.randn(loras, rank, width), torch.randn(loras, width, rank))
        p.row_scale, p.row_index = strengths, None
    x = torch.randn(2 * loras, 10, width)  # a CFG batch: [uncond rows, cond rows]
    with torch.no_grad():
        want = torch.cat([p(x) for p in parts], dim=-1)
        got = fused(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        bare = fused_base(x)
        assert torch.equal(got[1], bare[1]) and torch.equal(got[4], bare[4])  # strength 0: the base output exactly
        assert (got - bare).abs().max() > 0.1


def test_fused_generation_equals_unfused(tiny_backbone_dir):
    plain, fused = make_generator(tiny_backbone_dir), make_generator(tiny_backbone_dir, fuse_qkv=True)
    reqs = [GenerationRequest(p, reference=r, seed=s) for p, r, s in zip(PROMPTS, random_clips(2, seed=1) + [None], [1, 2, 3])]
    want = plain.generate(reqs)
    got = check_mixed_batch(fused)
    assert sum(isinstance(m, FusedLightLoRALinear) for m in fused.backbone.transformer.modules()) == 2
    for g, w in zip(got, want):
        # fused vs separate GEMMs differ in the last bits, amplified by CFG as in the mixed-batch check
        assert (g - w).abs().mean() < 1e-3, (g - w).abs().mean()
    tr = fused.backbone.transformer
    q = tr.transformer_blocks[0].attn1.to_q.base.weight
    assert q.data_ptr() == tr.transformer_blocks[0].attn1.to_qkv.base.weight.data_ptr()  # no second copy


def test_compiled_blocks_do_not_recompile_for_new_loras(tiny_backbone_dir):
    """Compiled once for a batch's shape; a new batch with other LoRAs (other strengths) runs the same graphs:
    a recompilation would raise here (error_on_recompile)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = make_generator(tiny_backbone_dir, compile_blocks=True, steps=2)
    eager = make_generator(tiny_backbone_dir, steps=2)
    refs = random_clips(4, seed=3)
    first = [GenerationRequest(p, reference=r, seed=s) for p, r, s in zip(PROMPTS[:2], refs[:2], [1, 2])]
    second = [GenerationRequest(p, reference=r, seed=s, lora_strength=w)
              for p, r, s, w in zip(PROMPTS[1:], refs[2:], [3, 4], [0.5, 1.0])]
    got = compiled.generate(first)
    for g, w in zip(got, eager.generate(first)):
        assert (g - w).abs().mean() < 1e-3
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled.generate(second)
    for g, w in zip(again, eager.generate(second)):
        assert (g - w).abs().mean() < 1e-3


def test_bad_options_name_the_field(tiny_backbone_dir):
    g = make_generator(tiny_backbone_dir, step_cache="teacache")
    with pytest.raises(ValueError, match="step_cache='teacache'"):
        g.generate([GenerationRequest("a red circle", seed=1)])
    g.config = dataclasses.replace(GEN, step_cache="pyramid_attention", step_cache_interval=1)
    with pytest.raises(ValueError, match="step_cache_interval=1"):
        g.generate([GenerationRequest("a red circle", seed=1)])


def test_magcache_calibrates_once_per_size_on_a_fixed_input(tiny_backbone_dir):
    """magcache's ratio table comes from a fixed bare input, not from the rows: a generator that saw other rows
    first gives the same video bit for bit, and the table is calibrated once per size, one ratio per step."""
    req = GenerationRequest("a red circle", reference=random_clips(1, seed=1)[0], seed=1)
    first = make_generator(tiny_backbone_dir, step_cache="magcache", step_cache_threshold=0.5)
    want = first.generate([req])[0]
    other = make_generator(tiny_backbone_dir, step_cache="magcache", step_cache_threshold=0.5)
    other.generate([GenerationRequest("a blue square", reference=random_clips(1, seed=5)[0], seed=7)])
    got = other.generate([req])[0]
    assert torch.equal(got, want)
    assert list(other.step_cost.mag_ratios) == [(GEN.steps, GEN.guidance_scale, 9, 32, 32)]
    ratios = other.step_cost.mag_ratios[(GEN.steps, GEN.guidance_scale, 9, 32, 32)]
    assert len(ratios) == GEN.steps and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    other.generate([GenerationRequest("a blue square", seed=2)], num_frames=5)
    other.generate([GenerationRequest("a blue square", seed=2)], guidance_scale=3.0)  # another CFG scale: its own
    assert len(other.step_cost.mag_ratios) == 3


def test_unset_settings_take_each_caches_measured_default():
    """A step-cache field left unset (None, `auto` in YAML or on the command line) is the chosen cache's measured
    setting, so choosing another cache never inherits magcache's numbers; a field that is set wins."""
    from pipelines.config import ServeConfig
    from video2lora.backbones.step_cost import CACHE_DEFAULTS, step_options

    bare = GenerationConfig()
    assert step_options(bare) == (4, (100, 800), 0.3)  # the shipped default: magcache 0.3, at least every 4th
    assert step_options(dataclasses.replace(bare, step_cache="first_block"))[2] == 0.4
    assert step_options(dataclasses.replace(bare, step_cache="pyramid_attention"))[:2] == (3, (50, 950))
    assert step_options(dataclasses.replace(bare, step_cache="faster"))[0] == 2
    for cache, measured in CACHE_DEFAULTS.items():  # every cache's defaults are settings it takes
        got = dict(zip(("interval", "timesteps", "threshold"), step_options(dataclasses.replace(bare, step_cache=cache))))
        assert {k: got[k] for k in measured} == measured, cache
    assert step_options(dataclasses.replace(bare, step_cache="first_block", step_cache_threshold=0.2))[2] == 0.2
    served = ServeConfig.from_args({"generation": {"step_cache": "taylorseer", "step_cache_interval": "auto",
                                                   "step_cache_threshold": "auto"}})
    assert step_options(served.generation)[:2] == (3, (50, 950))
    with pytest.raises(ValueError, match="step_cache_interval='often'"):
        step_options(dataclasses.replace(bare, step_cache_interval="often"))


def test_warm_up_calibrates_before_the_first_request(tiny_backbone_dir):
    """`warm_up` runs magcache's calibration at the configured size; the first request then calibrates nothing
    and makes the video a cold generator makes."""
    req = GenerationRequest("a red circle", reference=random_clips(1, seed=1)[0], seed=1)
    cold = make_generator(tiny_backbone_dir, step_cache="magcache").generate([req])[0]
    warm = make_generator(tiny_backbone_dir, step_cache="magcache")
    calls = []
    calibrate = warm.step_cost.calibrate_magcache
    warm.step_cost.calibrate_magcache = lambda *a: calls.append(a) or calibrate(*a)
    assert warm.warm_up() and len(calls) == 1
    assert torch.equal(warm.generate([req])[0], cold) and len(calls) == 1
    assert not warm.warm_up() and len(calls) == 1  # already calibrated
    assert not make_generator(tiny_backbone_dir, step_cache="none").warm_up()
