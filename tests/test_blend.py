"""Blended references and reused LoRA files in the library (tiny models): exact mixes, mixed batches."""

import pytest
import torch
from conftest import make_model, random_clips

from video2lora.config import GenerationConfig
from video2lora.export import ExportedLoRA
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.predict import PredictedLoRA

GEN = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=6.0)


@pytest.fixture(scope="module")
def gen(tiny_backbone_dir):
    from video2lora.backbones import Backbone

    backbone = Backbone.from_pretrained(tiny_backbone_dir, device="cpu")
    return Video2LoRAGenerator(backbone, make_model(backbone), GenerationConfig(**GEN))


@pytest.fixture(scope="module")
def refs():
    return random_clips(3, seed=5)


def test_one_reference_at_weight_one_is_todays_row_bit_for_bit(gen, refs):
    plain = gen.generate([GenerationRequest("a red circle", reference=refs[0], seed=1)])[0]
    mixed = gen.generate([GenerationRequest("a red circle", references=[refs[0]], reference_weights=[1.0], seed=1)])[0]
    assert torch.equal(plain, mixed)


def test_a_mix_is_the_weighted_sum_of_the_deltas_at_every_layer(gen, refs):
    p0, p1 = gen.predict_loras(refs[:2])
    w = [0.7, -0.4]
    blend = PredictedLoRA.blend([p0, p1], w)
    assert blend.rank == p0.rank + p1.rank
    (layers_mix, _), (layers_0, _), (layers_1, _) = (gen.materialize([x]) for x in (blend, p0, p1))
    assert len(layers_mix) == len(gen.layer_names) > 0
    for m, a, b in zip(layers_mix, layers_0, layers_1):
        delta = (m.up[0] @ m.down[0]).double()
        want = w[0] * (a.up[0] @ a.down[0]).double() + w[1] * (b.up[0] @ b.down[0]).double()
        assert want.abs().max() > 1e-3  # not trivially zero
        torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))  # float32 factors


def test_a_batch_of_blended_reused_and_plain_rows_equals_each_row_alone(gen, refs):
    p2 = gen.predict_loras([refs[2]])[0]
    exported = gen.lora_from_file(gen.export_lora(p2, 0.8), "row.safetensors")
    assert isinstance(exported, ExportedLoRA) and exported.rank == p2.rank

    def requests():
        return [GenerationRequest("a blend", references=refs[:2], reference_weights=[0.5, 0.5], seed=1),
                GenerationRequest("a reused file", lora=exported, seed=2),
                GenerationRequest("a plain row", reference=refs[1], seed=3),
                GenerationRequest("no lora", seed=4),
                GenerationRequest("a weak blend", references=refs, seed=5, lora_strength=0.3)]

    together = gen.generate(requests())
    # a batch rounds differently from a batch of one in the last bits, and CFG 6 over the steps amplifies that
    # (as in tests/test_step_cost.py); each row's LoRA effect is far larger than that difference
    for i, req in enumerate(requests()):
        alone = gen.generate([req])[0]
        bare = gen.generate([GenerationRequest(req.prompt, seed=req.seed)])[0]
        error, effect = (together[i] - alone).abs().max(), (alone - bare).abs().max()
        if i == 3:  # no LoRA
            assert error < 1e-4, error
        else:
            assert effect > 0.05 and error < 0.02 * effect, (i, float(error), float(effect))
    # the reused file is the predicted LoRA at strength 0.8 (folded into the file)
    direct = gen.generate([GenerationRequest("a reused file", lora=p2, seed=2, lora_strength=0.8)])[0]
    assert (together[1] - direct).abs().max() < 0.02 * (direct - gen.generate([GenerationRequest("a reused file", seed=2)])[0]).abs().max()


def test_bad_mixes_and_files_name_the_problem(gen, refs):
    p0 = gen.predict_loras([refs[0]])[0]
    with pytest.raises(ValueError, match="one weight per LoRA"):
        PredictedLoRA.blend([p0, p0], [1.0])
    from video2lora.config import InputError

    for w in (float("nan"), float("inf"), "x", None):
        with pytest.raises(InputError, match="finite") as err:
            PredictedLoRA.blend([p0, p0], [0.5, w])
        assert err.value.field == "reference_weights"
    with pytest.raises(InputError, match="finite"):  # the library's own request path checks the same
        gen.generate([GenerationRequest("x", references=[refs[0], refs[1]], reference_weights=[1.0, float("nan")])])
    from safetensors.torch import load, save

    state = load(gen.export_lora(p0, 1.0))
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="shape"):
        gen.lora_from_file(save(bad), "bad.safetensors")
    missing = dict(state)
    missing.pop(key)
    with pytest.raises(ValueError, match="missing"):
        gen.lora_from_file(save(missing), "missing.safetensors")
