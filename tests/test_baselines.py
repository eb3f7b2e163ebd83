"""Per-effect LoRA baseline: each effect trained on its own budget, stopped on its own validation loss."""

import pytest
import torch

from helpers import in_memory_data
from video2lora.effects.baselines import train_per_effect_loras, validation_losses, validation_split

EFFECTS = ["spin", "invert"]


def backbone_at(path):
    from video2lora.backbones import Backbone

    return Backbone.from_pretrained(path, device="cpu", dtype=torch.float32)


def test_validation_split_is_seeded_disjoint_and_per_effect():
    rows = ["a"] * 10 + ["b"] * 5 + ["c"] * 3
    train, val = validation_split(rows, ["a", "b"], 0.2, seed=0)
    assert (train, val) == validation_split(rows, ["a", "b"], 0.2, seed=0)
    assert len(val["a"]) == 2 and len(val["b"]) == 1
    assert not set(train) & {i for v in val.values() for i in v}
    assert {rows[i] for i in train} == {"a", "b"} and len(train) == 8 + 4  # "c" is not asked for
    with pytest.raises(ValueError, match="'d'.*at least 2"):
        validation_split(rows + ["d"], ["d"], 0.2, seed=0)


def test_each_effect_keeps_its_best_validated_weights(tiny_backbone_dir):
    backbone = backbone_at(tiny_backbone_dir)
    data = in_memory_data(backbone, EFFECTS, clips_per_label=5)
    model, report = train_per_effect_loras(backbone, data, effects=EFFECTS, rank=2, steps=12, batch_size=4, lr=5e-3,
                                           seed=0, early_stopping=True, eval_every=3, patience=2)
    _, val = validation_split(data.effects, EFFECTS, 0.2, seed=0)
    names = [n for n, _, _ in model.layers]
    again = validation_losses(backbone, data, model, names, val)  # the same timesteps and noise as in training
    for e in EFFECTS:
        r = report["effects"][e]
        assert again[e] == pytest.approx(r["best_loss"], rel=1e-5)
        assert r["best_loss"] <= r["start_loss"]
        measured = [h["val_loss"][e] for h in report["val_history"] if e in h["val_loss"]]
        assert r["best_loss"] == pytest.approx(min([r["start_loss"]] + measured), abs=1e-5)
        if r["best_step"] == 0:  # training never beat the bare backbone: its LoRA is the zero one
            assert all(float(u[model.effects.index(e)].abs().max()) == 0 for u in model.up)


def test_an_effects_validation_loss_does_not_depend_on_which_others_are_measured(tiny_backbone_dir):
    """Effects stop at different times; the survivors must keep their timesteps and noise, or a new best could be
    an artefact of the draw."""
    from video2lora.effects.baselines import PerEffectLoRAs
    from video2lora.lightlora import inject_lightlora

    backbone = backbone_at(tiny_backbone_dir)
    data = in_memory_data(backbone, EFFECTS + ["zoom_in"], clips_per_label=3)
    targets = tuple(backbone.lora_targets)
    names = inject_lightlora(backbone.transformer, targets)
    model = PerEffectLoRAs(EFFECTS + ["zoom_in"], backbone.lora_layers(targets), rank=2, seed=0)
    with torch.no_grad():
        for u in model.up:
            u.normal_(std=0.05)  # a LoRA that does something
    _, val = validation_split(data.effects, EFFECTS + ["zoom_in"], 0.4, seed=0)
    every = validation_losses(backbone, data, model, names, val)
    alone = validation_losses(backbone, data, model, names, {"invert": val["invert"]})
    assert alone["invert"] == every["invert"]
    assert len(set(every.values())) == 3


def test_an_effect_that_never_improves_stops_early_and_keeps_the_bare_backbone(tiny_backbone_dir):
    backbone = backbone_at(tiny_backbone_dir)
    data = in_memory_data(backbone, EFFECTS, clips_per_label=5)
    model, report = train_per_effect_loras(backbone, data, effects=EFFECTS, rank=2, steps=200, batch_size=4, lr=0.0,
                                           seed=0, early_stopping=True, eval_every=2, patience=2)
    assert report["steps_run"] == 2 * 2  # both stopped after 2 measurements without a new best, 2 steps apart
    for e in EFFECTS:
        r = report["effects"][e]
        assert r["stopped_at"] == r["best_step"] + 2 * 2  # patience 2 measurements, every 2 steps
        assert r["best_step"] == 0 and r["best_loss"] == r["start_loss"]  # lr 0: no measurement beats the start
        assert all(float(u[model.effects.index(e)].abs().max()) == 0 for u in model.up)  # the bare backbone


def test_without_early_stopping_every_clip_trains_for_every_step(tiny_backbone_dir):
    backbone = backbone_at(tiny_backbone_dir)
    data = in_memory_data(backbone, EFFECTS, clips_per_label=2)
    model, history = train_per_effect_loras(backbone, data, effects=EFFECTS, rank=2, steps=3, batch_size=4, seed=0)
    assert [h["step"] for h in history] == [1, 3] and model.effects == EFFECTS
    assert all(float(u.abs().max()) > 0 for u in model.up)  # up starts at zero; three steps moved it
