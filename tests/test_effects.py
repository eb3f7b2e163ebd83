"""Procedural effects world (video2lora.effects.world), its classifier and the dataset writer job."""

import itertools
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from video2lora.effects import world as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- effects
def test_effect_lists_and_split():
    assert len(fx.EFFECTS) >= 12 and len(set(fx.EFFECTS)) == len(fx.EFFECTS)
    assert len(fx.HELDOUT_EFFECTS) >= 4
    assert not set(fx.TRAIN_EFFECTS) & set(fx.HELDOUT_EFFECTS)
    assert fx.EFFECTS == list(fx.TRAIN_EFFECTS) + list(fx.HELDOUT_EFFECTS)
    assert fx.NONE not in fx.EFFECTS
    assert fx.resolve_effects("train") == list(fx.TRAIN_EFFECTS)
    assert fx.resolve_effects("heldout") == list(fx.HELDOUT_EFFECTS)
    assert fx.resolve_effects(None) == fx.resolve_effects("all") == fx.EFFECTS
    assert fx.resolve_effects("spin,burst") == ["spin", "burst"]
    with pytest.raises(ValueError):
        fx.resolve_effects(["no_such_effect"])
    assert {fx.effect_split(e) for e in fx.TRAIN_EFFECTS} == {"train"}
    assert {fx.effect_split(e) for e in fx.HELDOUT_EFFECTS} == {"heldout"}


@pytest.mark.parametrize("size,frames", [(32, 9), (64, 9), (32, 5)])
def test_every_effect_renders_in_range(size, frames):
    scene = fx.sample_scene(np.random.default_rng(3))
    for effect in fx.ALL_LABELS:
        v = fx.render_clip(scene, effect, num_frames=frames, size=size)
        assert v.shape == (3, frames, size, size) and v.dtype == np.float32, effect
        assert np.isfinite(v).all() and v.min() >= -1.0 and v.max() <= 1.0, effect
    assert np.array_equal(fx.render_clip(scene, None), fx.render_clip(scene, "none"))
    with pytest.raises(ValueError):
        fx.render_clip(scene, "no_such_effect")


def test_effects_animate_and_none_is_static():
    scene = fx.sample_scene(np.random.default_rng(4))
    static = fx.render_clip(scene, "none")
    assert np.allclose(static, static[:, :1])
    for effect in fx.EFFECTS:
        v = fx.render_clip(scene, effect)
        assert np.abs(v[:, 1:] - v[:, :-1]).mean() > 0.002, f"{effect} does not change over time"


def test_dataset_is_deterministic_per_seed():
    a = fx.make_dataset(7, 2)
    b = fx.make_dataset(7, 2)
    c = fx.make_dataset(8, 2)
    assert len(a) == 2 * len(fx.EFFECTS)
    assert [r["clip_id"] for r in a] == [r["clip_id"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["prompt"] == rb["prompt"] and np.array_equal(ra["video"], rb["video"])
    assert len({r["clip_id"] for r in a} & {r["clip_id"] for r in c}) == 0
    differ = sum(not np.array_equal(ra["video"], rc["video"]) for ra, rc in zip(a, c))
    assert differ == len(a)
    # scenes of an effect do not depend on which other effects are requested
    t = {r["clip_id"]: r for r in fx.make_dataset(7, 2, effects="train")}
    for r in a:
        if r["effect"] in t:
            assert np.array_equal(r["video"], t[r["clip_id"]]["video"])
    rec = a[0]
    for key in ("clip_id", "effect", "split", "prompt", "video", "shape", "colour", "background",
                "cx", "cy", "radius", "angle", "scene_seed"):
        assert key in rec
    assert rec["video"].shape == (3, 9, 32, 32)


def test_captions_describe_content_not_effect():
    banned = set()
    for e in fx.ALL_LABELS:
        banned |= {w for w in re.split(r"[_\s]", e) if len(w) >= 4}
        banned.add(e.replace("_", " "))
    banned |= {"color", "rotat", "move", "effect"}
    recs = fx.make_dataset(11, 3, effects=fx.ALL_LABELS)
    rng = np.random.default_rng(0)
    captions = [r["prompt"] for r in recs] + [fx.caption(fx.sample_scene(rng)) for _ in range(200)]
    for cap in captions:
        low = cap.lower()
        assert not any(b in low for b in banned), cap
    for r in recs:
        assert r["colour"] in r["prompt"] and r["shape"] in r["prompt"] and r["background"] in r["prompt"]


def test_scenes_are_valid():
    rng = np.random.default_rng(1)
    for _ in range(300):
        s = fx.sample_scene(rng)
        assert s.shape in fx.SHAPES and s.colour in fx.COLOURS and s.background in fx.BACKGROUNDS
        col = np.asarray(fx.COLOURS[s.colour])
        assert all(np.linalg.norm(col - np.asarray(stop)) >= 0.5 for stop in fx.BACKGROUNDS[s.background])
        assert 0.19 <= np.hypot(s.cx, s.cy) <= 0.41


def test_every_pair_of_effects_differs_clearly():
    rng = np.random.default_rng(2)
    for _ in range(6):
        scene = fx.sample_scene(rng)
        clips = {e: fx.render_clip(scene, e) for e in fx.ALL_LABELS}
        for a, b in itertools.combinations(fx.ALL_LABELS, 2):
            d = np.abs(clips[a] - clips[b])
            assert d.mean() > 0.012, (a, b, scene, d.mean())
            assert d.mean(axis=(0, 2, 3)).max() > 0.03, (a, b, scene)


def test_shapes_and_colours_differ():
    rng = np.random.default_rng(5)
    base = fx.sample_scene(rng)
    from dataclasses import replace

    shapes = [fx.render_clip(replace(base, shape=s), "none")[:, 0] for s in fx.SHAPES]
    for a, b in itertools.combinations(range(len(shapes)), 2):
        assert np.abs(shapes[a] - shapes[b]).mean() > 0.005, (fx.SHAPES[a], fx.SHAPES[b])


# ----------------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def trained_classifier():
    from video2lora.effects import judge as ec

    torch.set_num_threads(2)
    train = fx.make_dataset(100, 12)
    clips, labels = ec.records_to_arrays(train)
    model = ec.train_classifier(clips, {"effect": labels["effect"], "colour": labels["colour"]},
                                epochs=8, seed=0, batch_size=24, lr=4e-3)
    return model


def test_classifier_beats_chance_on_fresh_clips(trained_classifier):
    from video2lora.effects import judge as ec

    test = fx.make_dataset(200, 5)
    acc = ec.evaluate_records(trained_classifier, test)
    assert set(acc) == {"effect", "colour"}
    assert acc["effect"] >= 0.6, acc  # chance is 1/14
    assert acc["colour"] >= 0.4, acc  # chance is 1/8


def test_classifier_save_load_roundtrip(trained_classifier, tmp_path):
    from video2lora.effects import judge as ec

    path = str(tmp_path / "clf")
    trained_classifier.save(path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = ec.EffectClassifier.load(path)
    clips = np.stack([r["video"] for r in fx.make_dataset(300, 1)])
    a = trained_classifier.predict_proba(clips)
    b = loaded.predict_proba(clips)
    assert a.keys() == b.keys()
    for h in a:
        np.testing.assert_allclose(a[h], b[h], atol=1e-5)
    # other clip sizes are resampled; single clips are accepted
    big = fx.render_clip(fx.sample_scene(np.random.default_rng(0)), "spin", size=64)
    assert loaded.predict(big)["effect"][0] in fx.ALL_LABELS
    assert ec.per_class_accuracy(["a", "b", "a"], ["a", "a", "a"]) == {"a": pytest.approx(2 / 3)}


# ----------------------------------------------------------------------------- job
def test_write_effects_dataset(tmp_path):
    pytest.importorskip("av")
    from video2lora.effects.dataset import COLUMNS, write_effects_dataset

    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    try:
        from make_effects import main
    finally:
        sys.path.remove(os.path.join(ROOT, "jobs"))
    import pandas as pd

    from video2lora.video_io import read_video

    out = str(tmp_path / "fx")
    df = write_effects_dataset(out, seed=5, clips_per_effect=2, effects=["spin", "burst"])
    manifest = pd.read_parquet(os.path.join(out, "clips.parquet"))
    assert list(manifest.columns) == COLUMNS
    assert manifest.equals(df) and len(df) == 4
    assert dict(zip(df.effect, df.split)) == {"spin": "train", "burst": "heldout"}
    assert df.clip_id.is_unique
    for uri in df.video_uri:
        assert uri.startswith("clips/") and os.path.exists(os.path.join(out, uri))
    v = read_video(os.path.join(out, df.video_uri[0]), 9, 32, 32)
    ref = torch.from_numpy(fx.make_dataset(5, 2, effects=["spin"])[0]["video"])
    assert tuple(v.shape) == (3, 9, 32, 32)
    assert (v - ref).abs().mean() < 0.05  # lossy H.264 round trip stays close

    # the CLI (heldout effects only, absolute URIs)
    out2 = str(tmp_path / "fx2")
    assert main(["--out", out2, "--seed", "1", "--clips-per-effect", "1", "--effects", "heldout",
                 "--absolute-uris"]) == 0
    m2 = pd.read_parquet(os.path.join(out2, "clips.parquet"))
    assert sorted(m2.effect) == sorted(fx.HELDOUT_EFFECTS) and set(m2.split) == {"heldout"}
    assert all(os.path.isabs(u) and os.path.exists(u) for u in m2.video_uri)
    # --train-labels: the compound world's parts alone are training labels, though zoom_out / invert alone are
    # held out in the single-effects world; the other labels keep effect_split's split
    out3 = str(tmp_path / "fx3")
    assert main(["--out", out3, "--seed", "1", "--clips-per-effect", "1", "--effects", "zoom_out,invert,burst,spin+fade_out",
                 "--train-labels", "zoom_out,invert"]) == 0
    m3 = pd.read_parquet(os.path.join(out3, "clips.parquet"))
    assert dict(zip(m3.effect, m3.split)) == {"zoom_out": "train", "invert": "train", "burst": "heldout",
                                              "spin+fade_out": "heldout"}
    assert main(["--out", str(tmp_path / "fx4"), "--effects", "spin+invert", "--train-labels", "invert"]) == 2


def test_parts_alone_join_the_compounds_without_changing_their_clips():
    parts = fx.resolve_effects("combo-parts")
    assert sorted(parts) == sorted(fx.MOTIONS + fx.LOOKS) and len(parts) == 13
    assert fx.resolve_effects("combo-with-parts") == fx.COMBOS + parts
    recs = fx.make_dataset(3, 2, effects="combo-with-parts", train_labels="combo-parts")
    split = {r["effect"]: r["split"] for r in recs}
    assert {e for e, s in split.items() if s == "heldout"} == set(fx.COMBO_HELDOUT)  # parts alone all train
    alone = fx.make_dataset(3, 2, effects=["spin+fade_out", "invert"])  # an effect's scenes: not the set's
    both = [r for r in recs if r["effect"] in ("spin+fade_out", "invert")]
    assert [r["clip_id"] for r in both] == [r["clip_id"] for r in alone]
    assert all(np.array_equal(x["video"], y["video"]) for x, y in zip(both, alone))
    assert [r["split"] for r in alone] == ["heldout", "heldout", "heldout", "heldout"]
    with pytest.raises(ValueError, match="'invert'.*not among the effects rendered"):  # a label not rendered
        fx.make_dataset(3, 1, effects=["spin+invert"], train_labels=["invert"])


def test_compound_effects_are_their_motion_and_look():
    """'motion+look': the motion's geometry with the look's frame operation; held-out compounds are new
    pairings of parts that all appear in training compounds."""
    assert len(fx.COMBOS) == len(fx.MOTIONS) * len(fx.LOOKS) and len(fx.COMBO_HELDOUT) >= 4
    assert not set(fx.COMBO_TRAIN) & set(fx.COMBO_HELDOUT)
    assert fx.resolve_effects("combo-heldout") == list(fx.COMBO_HELDOUT)
    for c in fx.COMBO_HELDOUT:
        motion, look = fx.effect_factors(c)
        assert any(t.startswith(motion + "+") for t in fx.COMBO_TRAIN)
        assert any(t.endswith("+" + look) for t in fx.COMBO_TRAIN)
        assert fx.effect_split(c) == "heldout"
    assert fx.effect_factors("invert") == ("none", "invert") and fx.effect_factors("burst") == ("burst", "none")
    scene = fx.sample_scene(np.random.default_rng(4))
    slide = fx.render_clip(scene, "slide_left")
    both = fx.render_clip(scene, "slide_left+invert")
    half = both.shape[1] // 2
    np.testing.assert_allclose(both[:, :half], slide[:, :half], atol=1e-6)  # before the inversion: the slide
    np.testing.assert_allclose(both[:, half:], -slide[:, half:], atol=1e-6)  # after: the slide, inverted
    assert np.abs(fx.render_clip(scene, "spin+fade_out") - fx.render_clip(scene, "spin")).mean() > 0.05
    for bad in ("invert+spin", "spin+zoom_in", "spin+invert+fade_out", "wobble+invert"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            fx.render_clip(scene, bad)
    with pytest.raises(ValueError, match="wobble"):
        fx.resolve_effects("spin,wobble+invert")


def test_effect_lists_are_forgiving_about_spaces_not_about_emptiness():
    assert fx.resolve_effects(" spin + invert , zoom_in") == ["spin+invert", "zoom_in"]
    assert fx.effect_slug("spin+invert") == "spin-invert"
    with pytest.raises(ValueError, match="no effects"):
        fx.resolve_effects(" , ")


def test_named_effects_are_points_of_the_continuous_families():
    """spin = spin@270, zoom_in = zoom@2.2, slide_left = slide@180, slide_right = slide@0, fade_out = fade@1: bit
    for bit (the shipped backbone was trained on the named ones); zoom_out is zoom@1/3."""
    scene = fx.sample_scene(np.random.default_rng(5))
    for point, named in (("spin@270", "spin"), ("zoom@2.2", "zoom_in"), ("slide@180", "slide_left"),
                         ("slide@0", "slide_right"), ("fade@1", "fade_out"), ("slide@180+fade@1", "slide_left+fade_out")):
        np.testing.assert_array_equal(fx.render_clip(scene, point), fx.render_clip(scene, named), err_msg=point)
    assert np.abs(fx.render_clip(scene, "zoom@0.3333") - fx.render_clip(scene, "zoom_out")).max() < 1e-3
    for zero in ("wave@0", "fade@0", "blur@0", "hue@0", "spin@0", "zoom@1"):  # no effect at all
        np.testing.assert_allclose(fx.render_clip(scene, zero), fx.render_clip(scene, "none"), atol=1e-6, err_msg=zero)


@pytest.mark.parametrize("family,values", [("slide", (30, 35, 60, 120)), ("spin", (90, 100, 150, 270)),
                                           ("zoom", (1.5, 1.6, 2.0, 3.0)), ("hue", (90, 100, 150, 270)),
                                           ("blur", (1.0, 1.2, 2.0, 4.0)), ("wave", (0.1, 0.11, 0.2, 0.3)),
                                           ("fade", (0.3, 0.35, 0.6, 1.0))])
def test_family_clips_change_continuously_with_the_value(family, values):
    """A small step of the value changes the clip a little, larger steps more: held-out values are new points
    between training points, not new kinds."""
    scenes = [fx.sample_scene(np.random.default_rng(s)) for s in range(4)]
    base = [fx.render_clip(sc, f"{family}@{values[0]}") for sc in scenes]

    def dist(v):
        return float(np.mean([np.abs(fx.render_clip(sc, f"{family}@{v}") - b).mean() for sc, b in zip(scenes, base)]))
    d = [dist(v) for v in values[1:]]
    assert 0 < d[0] < d[1] < d[2], d


def test_family_labels_parse_and_name_what_is_wrong():
    assert fx.family_point("slide@45") == ("slide", 45.0) and fx.family_point("zoom_in") == ("zoom", 2.2)
    assert fx.family_point("invert") is None
    assert fx.effect_factors("slide@45+hue@90") == ("slide@45", "hue@90")
    assert fx.effect_factors("wave@0.2+invert") == ("wave@0.2", "invert")
    assert fx.effect_factors("blur@2") == ("none", "blur@2")
    assert fx.resolve_effects("slide@45+hue@90, zoom@1.5") == ["slide@45+hue@90", "zoom@1.5"]
    assert fx.effect_slug("slide@45+hue@-90") == "slide_45-hue_-90"
    for bad, says in (("twirl@3", "unknown family 'twirl'"), ("zoom@9", "zoom takes"), ("slide@left", "not a number"),
                      ("hue@90+slide@45", "unknown effect"), ("slide@45+zoom@2", "unknown effect")):
        with pytest.raises(ValueError, match=says):
            fx.resolve_effects(bad)


def test_family_world_holds_out_pairings_points_and_a_whole_family():
    """--world families: the hypernetwork's training pairings are grid points; the held-out effects are new
    pairings of grid points, new values between grid values, and compounds of a family no training clip has."""
    from video2lora.effects import labels

    train, held = set(fx.FAMILY_TRAIN), set(fx.FAMILY_HELDOUT)
    assert len(train) == 36 and not train & held and all(fx.effect_split(e) == "train" for e in train)
    assert all(fx.effect_split(e) == "heldout" for e in held)
    assert set(fx.FAMILY_EVAL_SEEN) <= train and set(fx.FAMILY_WORLD) == train | held | {"none"}
    motions = {fx.effect_factors(e)[0] for e in train}
    looks = {fx.effect_factors(e)[1] for e in train}
    assert motions == set(labels.FAMILY_MOTION_GRID) and looks == set(labels.FAMILY_LOOK_GRID)
    # every motion family meets every look family in training
    assert {(m.split("@")[0], k.split("@")[0]) for m, k in map(fx.effect_factors, train)} == {
        (m, k) for m in ("spin", "zoom", "slide") for k in ("hue", "fade", "blur")}
    for e in labels.FAMILY_HELDOUT_PAIRINGS:  # both parts seen, never together
        assert set(fx.effect_factors(e)) <= motions | looks
    for e in labels.FAMILY_HELDOUT_POINTS:  # exactly one part is a new value of a trained family
        new = [p for p in fx.effect_factors(e) if p not in motions | looks]
        assert len(new) == 1 and new[0].split("@")[0] in {"spin", "zoom", "slide", "hue", "fade", "blur"}
        family, value = fx.family_point(new[0])
        grid = sorted(fx.family_point(p)[1] for p in motions | looks if p.startswith(family + "@"))
        assert grid[0] < value < grid[-1]  # between grid values: interpolation, not extrapolation
    for e in labels.FAMILY_HELDOUT_FAMILY:
        assert fx.held_out_family(e) and fx.effect_factors(e)[1] in looks
    assert not any(fx.held_out_family(e) for e in train) and fx.HELDOUT_FAMILIES == ("wave",)
    assert not any("wave" in e for e in train)
    for name, expect in (("families-train", fx.FAMILY_TRAIN), ("families-heldout", fx.FAMILY_HELDOUT),
                         ("families-eval", fx.FAMILY_EVAL_SEEN + fx.FAMILY_HELDOUT), ("families-world", fx.FAMILY_WORLD)):
        assert fx.resolve_effects(name) == list(expect)
    assert [len(x) for x in (labels.FAMILY_HELDOUT_PAIRINGS, labels.FAMILY_HELDOUT_POINTS, labels.FAMILY_HELDOUT_FAMILY,
                             fx.FAMILY_EVAL_SEEN)] == [4, 6, 3, 7]
    assert len(fx.FAMILY_WORLD) == len(set(fx.FAMILY_WORLD)) == 50 and len(set(fx.FAMILY_TRAIN)) == 36
    assert sorted(Counter(fx.effect_factors(e)[1] for e in train).values()) == [4] * 4 + [5] * 4
    recs = fx.make_dataset(0, 1, effects=fx.FAMILY_WORLD)  # every label renders, with its split
    assert {r["effect"]: r["split"] for r in recs} == {e: fx.effect_split(e) for e in fx.FAMILY_WORLD}


def test_a_held_out_family_is_its_own_split_in_the_table_and_the_selection():
    from video2lora.effects.evaluation import row_split, selection_markdown, selection_score, table

    assert row_split("spin@-270+hue@-240") == "seen" and row_split("spin@180+fade@1") == "held-out"
    assert row_split("wave@0.25+fade@1") == "held-out family" and row_split("spin+pixelate") == "seen"
    effects = {"spin@-270+hue@-240": [1, 1], "spin@180+fade@1": [1, 0], "wave@0.25+fade@1": [0, 0]}
    results = [{"method": m, "effect": e, "split": row_split(e), "effect_ok": bool(ok and m == "video2lora"),
                "motion_ok": True, "look_ok": False, "content": 0.5}
               for m in ("video2lora", "no_lora") for e, oks in effects.items() for ok in oks]
    text, cells = table(results)
    assert cells["video2lora/held-out family"]["effect_accuracy"] == 0.0
    assert cells["video2lora/held-out"]["effect_accuracy"] == 0.5 and cells["video2lora/seen"]["rows"] == 2
    assert "| video2lora | held-out family | 2 |" in text
    assert selection_score(cells) == (1.0 + (0.5 * 2 + 0.0 * 2) / 4) / 2  # seen vs every held-out row pooled
    two_splits = {k: v for k, v in cells.items() if "family" not in k}  # e.g. a result scored before the change
    md = selection_markdown([(500, two_splits), (1000, cells)], 1000, seed=101, refs_per_effect=2)
    assert "effect acc. held-out family" in md
    assert "| step 1000 (chosen) | 1.00 ± 0.00 | 0.50 ± 0.50 | 0.00 ± 0.00 |" in md
    assert "| step 500 | 1.00 ± 0.00 | 0.50 ± 0.50 | - |" in md  # the missing cell shown, not the column dropped
