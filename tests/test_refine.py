"""Refining a predicted LoRA on its own reference (video2lora/refine.py, GenerationConfig.refine_steps)."""

import dataclasses

import pytest
import torch
from conftest import make_model, random_clips

from video2lora.backbones import Backbone
from video2lora.config import GenerationConfig, InputError
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.lightlora import LayerLoRA, per_sample_loras
from video2lora.training.loss import backbone_fingerprint

GEN = GenerationConfig(num_frames=9, height=32, width=32, steps=3, guidance_scale=6.0, step_cache="none")
REFINE = dataclasses.replace(GEN, refine_steps=12, refine_lr=1e-2)


@pytest.fixture(scope="module")
def generator(tiny_backbone_dir):
    backbone = Backbone.from_pretrained(tiny_backbone_dir, device="cpu")
    return Video2LoRAGenerator(backbone, make_model(backbone), REFINE)


def reference_loss(gen, lora, ref, prompt, draws=32):
    """The diffusion loss of `ref` under `lora`, over fixed noise draws none of the refinement steps used."""
    bb = gen.backbone
    with torch.no_grad():
        latents = bb.encode_video(ref[None], generator=None).expand(draws, -1, -1, -1, -1)
        embeds = bb.encode_prompts([prompt]).expand(draws, -1, -1)
        a, b = lora.a_pred[None].expand(draws, -1, -1, -1), lora.b_pred[None].expand(draws, -1, -1, -1)
        layers = [LayerLoRA(l.down, l.up) for l in gen.model.materialize(a, b)]
        with per_sample_loras(bb.transformer, gen.layer_names, layers, torch.ones(draws)):
            return float(bb.training_loss(latents, embeds, generator=torch.Generator().manual_seed(987)).mean())


def test_refinement_lowers_the_reference_loss_and_leaves_the_models_frozen(generator):
    ref, prompt = random_clips(1, seed=21)[0], "a red circle"
    predicted = generator.predict_loras([ref])[0]
    before = backbone_fingerprint(generator.backbone)
    aux = {k: v.clone() for k, v in generator.model.state_dict().items()}
    refined = generator.refine_loras([predicted], [ref], [prompt])[0]
    assert backbone_fingerprint(generator.backbone) == before
    assert all(torch.equal(v, generator.model.state_dict()[k]) for k, v in aux.items())
    assert not any(p.requires_grad for p in generator.backbone.transformer.parameters())
    assert not any(p.requires_grad for p in generator.model.parameters())
    assert refined.a_pred.shape == predicted.a_pred.shape and refined.b_pred.shape == predicted.b_pred.shape
    loss_predicted = reference_loss(generator, predicted, ref, prompt)
    loss_refined = reference_loss(generator, refined, ref, prompt)
    assert loss_refined < 0.9 * loss_predicted, (loss_refined, loss_predicted)
    # zero steps: the prediction itself
    zero = Video2LoRAGenerator(generator.backbone, generator.model, GEN).refine_loras([predicted], [ref], [prompt])[0]
    assert zero is predicted


def test_refinement_leaves_activation_checkpointing_as_it_found_it(generator):
    ref = random_clips(1, seed=25)[0]
    lora = generator.predict_loras([ref])[0]
    bb = generator.backbone
    for before in (True, False):
        bb.enable_activation_checkpointing(before)
        generator.refine_loras([lora], [ref], ["a red circle"])
        assert bb.transformer.gradient_checkpointing is before


def test_a_reference_is_refined_the_same_alone_or_with_others(generator):
    refs = random_clips(2, seed=22)
    loras = generator.predict_loras(refs)
    both = generator.refine_loras(loras, refs, ["a red circle", "a blue square"])
    alone = generator.refine_loras(loras[1:], refs[1:], ["a blue square"])
    assert torch.equal(both[1].a_pred, alone[0].a_pred) and torch.equal(both[1].b_pred, alone[0].b_pred)
    assert not torch.equal(both[0].a_pred, loras[0].a_pred)
    # the caption is part of what it is refined with
    other = generator.refine_loras(loras[1:], refs[1:], ["a green ring"])
    assert not torch.equal(other[0].b_pred, alone[0].b_pred)


def test_generate_refines_one_reference_and_refuses_a_mix(generator):
    ref = random_clips(1, seed=23)[0]
    request = GenerationRequest("a blue square", reference=ref, reference_prompt="a red circle", seed=3)
    made = generator.generate([request])[0]
    predicted = request.lora  # the request keeps the prediction, not the refined LoRA
    refined = generator.refine_loras([predicted], [ref], ["a red circle"])[0]
    plain = Video2LoRAGenerator(generator.backbone, generator.model, GEN)
    assert torch.equal(made, plain.generate([GenerationRequest("a blue square", lora=refined, seed=3)])[0])
    unrefined = plain.generate([GenerationRequest("a blue square", lora=predicted, seed=3)])[0]
    assert (made - unrefined).abs().mean() > 1e-3
    with pytest.raises(InputError) as e:
        generator.generate([GenerationRequest("x", references=[ref, ref], seed=1)])
    assert e.value.field == "reference_uris" and "refine_steps" in str(e.value)


def test_refinement_runs_without_the_step_cache(tiny_backbone_dir):
    """A step cache skips blocks; the refinement's training forward must not: refined LoRAs match a cache-free
    generator's, after a cached generation has turned the cache on."""
    results = []
    for cache in ("first_block", "none"):
        backbone = Backbone.from_pretrained(tiny_backbone_dir, device="cpu")
        gen = Video2LoRAGenerator(backbone, make_model(backbone),
                                  dataclasses.replace(REFINE, step_cache=cache, step_cache_threshold=1.0))
        ref = random_clips(1, seed=24)[0]
        lora = gen.predict_loras([ref])[0]
        gen.generate([GenerationRequest("a red circle", lora=lora, seed=1)])  # the cache, if any, is on now
        results.append(gen.refine_loras([lora], [ref], ["a red circle"])[0])
    torch.testing.assert_close(results[0].a_pred, results[1].a_pred, atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0].b_pred, results[1].b_pred, atol=1e-6, rtol=0)


def scaled(lora, k):
    from video2lora.predict import PredictedLoRA

    return PredictedLoRA(lora.a_pred * k, lora.b_pred * k)


def reference_inputs(gen, ref):
    lat = gen.backbone.encode_video(ref[None], generator=None)[0]
    return [lat], [ref[:, 0]]


def test_reference_fit_is_one_without_a_lora_below_it_once_refined_and_above_it_for_a_wrong_lora(generator):
    """The fit of a LoRA on its own reference: exactly 1 when the LoRA adds nothing, lower for the LoRA refined on
    that reference, above 1 for a LoRA that pushes the backbone away from it; the same on every call."""
    ref, prompt = random_clips(1, seed=26)[0], "a red circle"
    predicted = generator.predict_loras([ref])[0]
    latents, frames = reference_inputs(generator, ref)
    fit = lambda lora: generator.reference_fits_from_latents([lora], latents, frames, [prompt])[0]  # noqa: E731
    assert fit(scaled(predicted, 0.0)) == pytest.approx(1.0, abs=1e-6)
    refined = generator.refine_loras([predicted], [ref], [prompt])[0]
    assert fit(refined) < fit(predicted) and fit(refined) < 1.0
    assert fit(scaled(predicted, 40.0)) > 1.01  # the tiny DiT saturates near 1.02
    with pytest.raises(ValueError, match="non-finite"):
        fit(scaled(predicted, float("nan")))
    assert fit(predicted) == fit(predicted)


def test_unfamiliar_references_get_their_own_step_count(generator):
    """refine_steps_unfamiliar: a reference whose LoRA fits it worse than no LoRA is refined for that many steps,
    the others for refine_steps, each exactly as a generator with that one step count refines it."""
    ref, prompt = random_clips(1, seed=27)[0], "a red circle"
    predicted = generator.predict_loras([ref])[0]
    familiar, unfamiliar = generator.refine_loras([predicted], [ref], [prompt])[0], scaled(predicted, 40.0)
    adaptive = Video2LoRAGenerator(generator.backbone, generator.model,
                                   dataclasses.replace(REFINE, refine_steps=3, refine_steps_unfamiliar=7))
    latents, frames = reference_inputs(generator, ref)
    fits = adaptive.reference_fits_from_latents([familiar, unfamiliar], latents * 2, frames * 2, [prompt] * 2)
    assert fits[0] < 1 < fits[1]
    got = adaptive.refine_loras([familiar, unfamiliar], [ref, ref], [prompt] * 2)
    for lora, steps, out in ((familiar, 3, got[0]), (unfamiliar, 7, got[1])):
        fixed = Video2LoRAGenerator(generator.backbone, generator.model, dataclasses.replace(REFINE, refine_steps=steps))
        want = fixed.refine_loras([lora], [ref], [prompt])[0]
        assert torch.equal(out.a_pred, want.a_pred) and torch.equal(out.b_pred, want.b_pred), steps
    # fits handed in (the batch job's generation stage measures and records them) pick the steps the same way
    given = adaptive.refine_loras_from_latents([familiar], latents, frames, [prompt], fits=[2.0])[0]
    want = fixed.refine_loras([familiar], [ref], [prompt])[0]  # `fixed` refines for 7 steps
    assert torch.equal(given.a_pred, want.a_pred) and torch.equal(given.b_pred, want.b_pred)


@pytest.mark.parametrize("kwargs,field", [({"refine_steps_unfamiliar": 160}, "refine_steps_unfamiliar"),
                                          ({"refine_steps": 80, "refine_steps_unfamiliar": -1}, "refine_steps_unfamiliar"),
                                          ({"refine_steps": 80, "refine_steps_unfamiliar": 1.5}, "refine_steps_unfamiliar"),
                                          ({"measure_reference_fit": "yes"}, "measure_reference_fit")])
def test_bad_unfamiliar_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("field,value", [("refine_steps", -1), ("refine_steps", 2.5), ("refine_draws", 0),
                                         ("refine_lr", 0.0), ("refine_lr", 5.0)])
def test_bad_refine_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


def test_fingerprints_change_with_refinement_only_when_refining(tmp_path):
    """A job without refinement keeps the fingerprints its rows had before `reference_prompt` existed; a refining
    job's rows change with the refinement settings and the caption."""
    from pipelines.batch import plan_row
    from pipelines.fingerprint import row_fingerprint

    def planned(generation, **row):
        job = {"checkpoint": "c", "backbone": "b", **({"refine": [generation.refine_steps, generation.refine_lr]}
                                                      if generation.refine_steps else {})}
        out = plan_row({"sample_id": "s", "reference_uri": "/refs/a.mp4", "prompt": "p", **row},
                       dataclasses.asdict(generation), job, str(tmp_path))
        return out, job

    plain, job = planned(GEN)
    old = {k: v for k, v in plain.items() if k != "reference_prompt"}  # the row as planned before the column
    assert plain["reference_prompt"] == "" and plain["row_fingerprint"] == row_fingerprint(old, job, "")
    assert planned(GEN, reference_prompt="a red circle")[0]["row_fingerprint"] == plain["row_fingerprint"]
    refining = planned(REFINE, reference_prompt="a red circle")[0]["row_fingerprint"]
    assert refining != plain["row_fingerprint"]
    assert refining != planned(REFINE, reference_prompt="a blue square")[0]["row_fingerprint"]
    assert refining != planned(dataclasses.replace(REFINE, refine_steps=13), reference_prompt="a red circle")[0]["row_fingerprint"]
    # rows a refining job does not refine keep their fingerprints: strength 0, a LoRA file
    assert (planned(REFINE, lora_strength=0.0, reference_prompt="a red circle")[0]["row_fingerprint"]
            == planned(GEN, lora_strength=0.0)[0]["row_fingerprint"])
    lora_row = {"reference_uri": None, "lora_uri": "/loras/x.safetensors"}
    assert planned(REFINE, **lora_row)[0]["row_fingerprint"] == planned(GEN, **lora_row)[0]["row_fingerprint"]
    with pytest.raises(InputError) as e:
        planned(REFINE, reference_prompt=3)
    assert e.value.field == "reference_prompt"


def test_job_signature_names_refinement_only_when_on():
    from pipelines.config import BatchJobConfig
    from pipelines.fingerprint import job_signature

    assert "refine" not in job_signature(BatchJobConfig(generation=GEN), checkpoint_id="c")
    assert job_signature(BatchJobConfig(generation=REFINE), checkpoint_id="c")["refine"][:2] == [12, 1e-2]
    # the unfamiliar references' steps count when set; a job without them keeps the signature it had before
    plain = job_signature(BatchJobConfig(generation=REFINE), checkpoint_id="c")["refine"]
    assert len(plain) == 4
    unfamiliar = dataclasses.replace(REFINE, refine_steps_unfamiliar=160)
    assert job_signature(BatchJobConfig(generation=unfamiliar), checkpoint_id="c")["refine"] == plain + [160]


def test_the_online_app_refuses_refinement():
    from pipelines.config import ServeConfig

    with pytest.raises(ValueError, match="refine_steps"):
        ServeConfig(generation=REFINE)
    with pytest.raises(ValueError, match="measure_reference_fit"):
        ServeConfig(generation=dataclasses.replace(GEN, measure_reference_fit=True))
    with pytest.raises(ValueError, match="refine_steps"):
        ServeConfig.from_args({"generation": {"refine_steps": 4}})
