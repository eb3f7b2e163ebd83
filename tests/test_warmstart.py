"""Factorised warm-start tables: one LoRA per part (motion, look), a compound's LoRA its parts side by side."""

import pytest
import torch

from helpers import in_memory_data
from video2lora.effects import world as fx

COMPOUNDS = ["spin+invert", "spin+fade_out", "zoom_in+invert"]  # zoom_in+fade_out: never fitted, made of fitted parts


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    from video2lora.backbones import Backbone

    return Backbone.from_pretrained(tiny_backbone_dir, device="cpu", dtype=torch.float32)


def make_model(backbone, rank):
    from pipelines.train import model_config
    from video2lora.generate import new_model_for

    return new_model_for(backbone, model_config({"lora": {"rank": rank}, "hyper": {"width": 32, "num_blocks": 1,
                                                                                     "num_heads": 2}}), seed=0)


def test_factorised_table_shares_parts_and_composes_unseen_compounds(backbone):
    from video2lora.training.warmstart import fit_lora_tables, table_weights

    data = in_memory_data(backbone, COMPOUNDS)
    model = make_model(backbone, rank=2)
    table, history = fit_lora_tables(model, backbone, data, steps=6, batch_size=4, lr=1e-2, parts_of=fx.effect_factors)
    assert table.groups == sorted(COMPOUNDS) and table.units == ["fade_out", "invert", "spin", "zoom_in"]
    assert table.a_units.shape[2] == 1 and table.a_pred.shape[2] == 2  # rank 2 = two rank-1 parts
    assert float(table.b_units.abs().sum()) > 0  # the fit moved B away from its zero start
    spin, invert, fade, zoom = (table.units.index(u) for u in ("spin", "invert", "fade_out", "zoom_in"))
    g = table.groups.index("spin+invert")
    torch.testing.assert_close(table.a_pred[g, :, 0], table.a_units[spin, :, 0])  # motion first, look second
    torch.testing.assert_close(table.b_pred[g, :, :, 1], table.b_units[invert, :, :, 0])
    # spin+invert and spin+fade_out share the spin part exactly
    torch.testing.assert_close(table.a_pred[table.groups.index("spin+fade_out"), :, 0], table.a_pred[g, :, 0])
    a, b = table.weights(["zoom_in+fade_out"])  # never fitted: composed from parts fitted with other partners
    torch.testing.assert_close(a[0, :, 0], table.a_units[zoom, :, 0])
    torch.testing.assert_close(b[0, :, :, 1], table.b_units[fade, :, :, 0])
    unseen = in_memory_data(backbone, ["zoom_in+fade_out"], 1)
    wa, wb = table_weights(unseen, table)([0])
    torch.testing.assert_close(wa, a)

    # the file a warm start writes (lora_tables.safetensors) reads back as the same table, composing as before
    again = type(table).from_bytes(table.to_bytes(), "tables.safetensors", fx.effect_factors)
    assert (again.groups, again.units) == (table.groups, table.units)
    for name in ("a_pred", "b_pred", "a_units", "b_units"):
        assert torch.equal(getattr(again, name), getattr(table, name)), name
    assert all(torch.equal(x, y) for x, y in zip(again.weights(["zoom_in+fade_out"]), (a, b)))


def test_factorised_table_refuses_what_it_cannot_split(backbone):
    from video2lora.training.warmstart import fit_lora_tables

    data = in_memory_data(backbone, COMPOUNDS, 1)
    with pytest.raises(ValueError, match="rank divisible"):  # two parts cannot share a rank-1 LoRA
        fit_lora_tables(make_model(backbone, rank=1), backbone, data, steps=1, parts_of=fx.effect_factors)
    table, _ = fit_lora_tables(make_model(backbone, rank=1), backbone, data, steps=1)  # plain: one LoRA per group
    assert table.units is None
    with pytest.raises(KeyError, match="zoom_in\\+fade_out"):
        table.weights(["zoom_in+fade_out"])
    again = type(table).from_bytes(table.to_bytes(), "plain.safetensors")
    assert again.units is None and again.groups == table.groups and torch.equal(again.b_pred, table.b_pred)
    with pytest.raises(ValueError, match="bad.safetensors: not a safetensors file"):  # a pickle is never unpickled
        type(table).from_bytes(b"\x80\x04" + bytes(64), "bad.safetensors")
    from safetensors.torch import save
    with pytest.raises(ValueError, match="other.safetensors: not a LoRA table"):  # safetensors, but no table
        type(table).from_bytes(save({"w": torch.zeros(2)}), "other.safetensors")


@pytest.mark.parametrize("rank", [2, 4])  # rank-1 and rank-2 parts
def test_part_accuracy_reads_each_slot(backbone, monkeypatch, rank):
    """A model predicting exactly the composed parts scores 1 on every slot, also on a compound never fitted;
    one predicting the parts in the wrong slots does not."""
    from video2lora.training.warmstart import fit_lora_tables, part_accuracy

    data = in_memory_data(backbone, COMPOUNDS, 1)
    model = make_model(backbone, rank=rank)
    table, _ = fit_lora_tables(model, backbone, data, steps=4, batch_size=3, lr=1e-2, parts_of=fx.effect_factors)
    unseen = in_memory_data(backbone, ["zoom_in+fade_out"], 2)
    current = {}

    def oracle(latents):  # the table's own LoRA of each row's label
        return table.weights(current["labels"])

    monkeypatch.setattr(model, "predict", oracle)
    for d in (data, unseen):
        current["labels"] = d.effects
        assert part_accuracy(model, d, table) == [1.0, 1.0]

    def swapped(latents):  # the look's part in the motion's slot and back
        a, b = table.weights(current["labels"])
        h = rank // 2
        return torch.cat([a[:, :, h:], a[:, :, :h]], 2), torch.cat([b[..., h:], b[..., :h]], 3)

    monkeypatch.setattr(model, "predict", swapped)
    current["labels"] = unseen.effects
    assert part_accuracy(model, unseen, table) == [0.0, 0.0]


def test_a_part_alone_trains_its_part_and_leaves_the_other_slot_empty(backbone):
    """Motions and looks alone beside compounds (`jobs/recipe.py --train-parts`): the empty part's LoRA is exactly
    zero, a part alone shares its part with the compounds that have it, and the fit still moves every real part."""
    from video2lora.training.warmstart import EMPTY_PART, fit_lora_tables

    assert EMPTY_PART == fx.NONE  # the name effect_factors gives a missing part
    labels = ["spin+invert", "zoom_in+fade_out", "spin", "invert", "fade_out"]
    data = in_memory_data(backbone, labels, 2)
    table, _ = fit_lora_tables(make_model(backbone, rank=2), backbone, data, steps=6, batch_size=5, lr=1e-2,
                               parts_of=fx.effect_factors)
    assert table.units == ["fade_out", "invert", "none", "spin", "zoom_in"]
    none = table.units.index("none")
    assert float(table.a_units[none].abs().sum()) == 0 and float(table.b_units[none].abs().sum()) == 0
    assert all(float(table.b_units[u].abs().sum()) > 0 for u in range(len(table.units)) if u != none)
    spin, invert = table.groups.index("spin"), table.groups.index("invert")
    assert float(table.b_pred[spin, ..., 1].abs().sum()) == 0 and float(table.b_pred[invert, ..., 0].abs().sum()) == 0
    both = table.groups.index("spin+invert")
    torch.testing.assert_close(table.b_pred[spin, ..., 0], table.b_pred[both, ..., 0])  # spin's part, shared
    torch.testing.assert_close(table.a_pred[invert, :, 1], table.a_pred[both, :, 1])
    a, b = table.weights(["zoom_in+invert"])  # never fitted: composed, no empty part in it
    assert float(b[0, ..., 0].abs().sum()) > 0 and float(b[0, ..., 1].abs().sum()) > 0


def test_factorisation_errors_name_the_label(backbone):
    from video2lora.training.warmstart import check_factorisation, fit_lora_tables

    # a part that is a motion for one label and a look for another cannot have one slot
    with pytest.raises(ValueError, match="'invert' of 'x'"):
        check_factorisation(["w", "x"], lambda g: ("spin", "invert") if g == "w" else ("invert", "spin"), 2)
    # the empty part may sit in either slot: "invert" alone is (none, invert), "burst" is (burst, none)
    assert check_factorisation(["invert", "burst"], fx.effect_factors, 2) == [["none", "invert"], ["burst", "none"]]
    data = in_memory_data(backbone, ["spin+invert", "zoom_in+invert"], 1)
    table, _ = fit_lora_tables(make_model(backbone, rank=2), backbone, data, steps=1, parts_of=fx.effect_factors)
    with pytest.raises(KeyError, match="fade_out"):  # a part no training label had: no LoRA to compose
        table.weights(["spin+fade_out"])
    with pytest.raises(ValueError, match="no labels"):
        table.weights([])


class CountingReader:
    """Stands in for the shard reader: every clip is 24 KiB of latents, each read on record."""

    def __init__(self):
        self.reads = 0

    def example(self, shard, clip_id, fields):
        self.reads += 1
        g = torch.Generator().manual_seed(int(clip_id))
        return {"latents": torch.randn(4, 3, 8, 8, generator=g).repeat(1, 1, 1, 8),  # (4, 3, 8, 64) float32
                "prompt_embeds": torch.zeros(16, 32)}


def shard_data(num_clips, max_cache_bytes):
    from video2lora.training import PreparedData

    index = [{"clip_id": str(i), "shard": "s0", "effect": f"e{i % 4}", "split": "train"} for i in range(num_clips)]
    return PreparedData(uri="memory", info={}, index=index, empty_prompt=torch.zeros(16, 32),
                        max_cache_bytes=max_cache_bytes, _reader=CountingReader())


@pytest.mark.parametrize("num_clips", [40, 400])
def test_prepared_examples_stream_through_a_bounded_cache(num_clips):
    from video2lora.training.data import example_bytes

    bound = 10 * example_bytes(CountingReader().example("s0", "0", ()))
    data = shard_data(num_clips, bound)
    for epoch in range(2):
        for i in range(num_clips):
            assert torch.equal(data.example(i)["latents"], CountingReader().example("s0", str(i), ())["latents"])
    assert data.cached_examples == 10 and data._read_bytes <= bound  # the same for 40 clips as for 400
    assert data._reader.reads == 2 * num_clips  # a cycle through more clips than fit re-reads them
    hot = [data.example(num_clips - 1) for _ in range(5)]  # a recent clip is served from the cache
    assert data._reader.reads == 2 * num_clips and all(h is hot[0] for h in hot)


@pytest.mark.parametrize("num_clips", [40, 400])
def test_warm_start_regression_holds_a_bounded_number_of_clips(backbone, num_clips):
    """The regression reads each batch's latents when it needs them: tenfold clips, the same cache."""
    from video2lora.training.data import example_bytes
    from video2lora.training.warmstart import LoRATable, regress_hypernet

    bound = 10 * example_bytes(CountingReader().example("s0", "0", ()))
    data = shard_data(num_clips, bound)
    model = make_model(backbone, rank=1)
    layers, lc = len(model.config.layers), model.config.lora
    g = torch.Generator().manual_seed(0)
    table = LoRATable(groups=["e0", "e1", "e2", "e3"], a_pred=torch.randn(4, layers, lc.rank, lc.down, generator=g),
                      b_pred=torch.randn(4, layers, lc.up, lc.rank, generator=g))
    history = regress_hypernet(model, data, table, steps=3, batch_size=4, lr=2e-3, log_every=3)
    assert len(history) == 2 and history[-1]["fit"]["relative_error"] > 0
    # the rate decays to zero (cosine), so the run does not end on whatever spike its last steps took
    assert history[0]["lr"] == 2e-3 and history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert data.cached_examples <= 10 and data._read_bytes <= bound


def test_motion_stream_regresses_and_trains_the_same_under_the_same_seed(backbone):
    """hyper.motion_stream through the warm start's regression and the training loss: its look randomisation is
    drawn from the step's generator, so a run repeats exactly (torch's global generator would not repeat)."""
    from pipelines.train import model_config
    from video2lora.generate import new_model_for
    from video2lora.training.data import collate
    from video2lora.training.loss import prepare_backbone, training_step
    from video2lora.training.warmstart import fit_lora_tables, part_accuracy, regress_hypernet

    data = in_memory_data(backbone, COMPOUNDS, 2)
    config = {"lora": {"rank": 2}, "hyper": {"width": 32, "num_blocks": 1, "num_heads": 2, "motion_stream": True}}
    table, _ = fit_lora_tables(new_model_for(backbone, model_config(config), seed=0), backbone, data, steps=2,
                               batch_size=3, parts_of=fx.effect_factors)
    runs = []
    for _ in range(2):
        model = new_model_for(backbone, model_config(config), seed=0)
        history = regress_hypernet(model, data, table, steps=3, batch_size=3, log_every=3, val_fraction=0)
        runs.append((history[-1]["loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0] and all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert len(part_accuracy(model, data, table)) == 2  # a slot per stream
    prepare_backbone(backbone, model)
    batch = collate([data.example(i) for i in range(3)], [data.example(i) for i in (1, 2, 0)])
    loss = lambda seed: float(training_step(model.train(), backbone, batch, torch.Generator().manual_seed(seed)))  # noqa: E731
    assert loss(0) == loss(0)
