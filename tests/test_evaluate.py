"""The synthetic-effects benchmark's quick mode, end to end: the shipped checkpoint, its frozen backbone, the
shipped judge and per-effect LoRAs, generation through the Ray batch pipeline, the table and the contact sheets."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "video2lora", "assets", "checkpoint")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ASSETS, "backbone", "model_index.json")),
                                reason="no shipped trained checkpoint")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--quick", "--seed", "3", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def test_quick_table_structure(quick_run):
    from video2lora.effects.world import effect_parts

    out, stdout, report = quick_run
    assert "| method | split | rows | effect accuracy | motion accuracy | look accuracy | content fidelity |" in stdout
    assert (out / "table.md").read_text().startswith("Synthetic-effects benchmark")
    methods = ("video2lora", "no_lora", "per_effect_lora")
    for m in methods:
        for split in ("seen", "held-out"):
            cell = report["table"][f"{m}/{split}"]
            assert cell["rows"] == 2  # quick: two seen and two held-out effects, one reference each
            assert 0.0 <= cell["effect_accuracy"] <= 1.0 and 0.0 <= cell["content_fidelity"] <= 1.0
    assert len(report["rows"]) == 4 * len(methods)
    for r in report["rows"]:
        effect_parts(r["pred_effect"])  # a label of the effects world (raises otherwise)
        assert os.path.exists(r["video"]) and isinstance(r["motion_ok"], bool)
        assert r["prompt"] != r["reference_prompt"]  # new content, not the reference's scene
    assert 0.0 <= report["classifier_test_accuracy"]["effect"] <= 1.0


def test_contact_sheets_written(quick_run):
    from PIL import Image

    out, _, report = quick_run
    assert sorted(os.path.basename(p) for p in report["sheets"]) == sorted(f"{e}.png" for e in report["effects"])
    for p in report["sheets"]:
        img = Image.open(p)
        assert img.width > 9 * 32 and img.height >= 4 * 32  # reference + three methods, nine frames each


def test_lora_changes_the_video_deterministically(quick_run):
    """Same prompt and seed: the predicted LoRA must change the generated video (strength 0 is the backbone)."""
    from video2lora.video_io import read_video

    out, _, report = quick_run
    by = {(r["method"], r["name"]): r for r in report["rows"]}
    diffs = []
    for (method, name), r in by.items():
        if method == "video2lora":
            a, b = read_video(r["video"], 9, 32, 32), read_video(by[("no_lora", name)]["video"], 9, 32, 32)
            diffs.append(float((a - b).abs().mean()))
    assert min(diffs) > 0.01, diffs


def test_cached_run_against_the_uncached_one(quick_run, tmp_path):
    """The quality item of the step caches: the same rows and seeds with a cache, and every video's PSNR against
    the uncached run's; the table cells carry standard errors."""
    first, _, _ = quick_run
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--quick", "--seed", "3", "--output", str(tmp_path),
                           "--no-per-effect", "--step-cache", "first_block", "--step-cache-threshold", "0.4",
                           "--against", str(first)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["step_cost"]["step_cache"] == "first_block" and report["step_cost"]["step_cache_threshold"] == 0.4
    assert {r["method"] for r in report["rows"]} == {"video2lora", "no_lora"}  # the baseline skipped
    for m in ("video2lora", "no_lora"):
        cell = report["table"][f"{m}/psnr_against"]
        assert cell["rows"] == 4 and 10 < cell["psnr_db"] < 100  # the cache changed the videos, a little
        assert cell["psnr_db_se"] >= 0
        for split in ("seen", "held-out"):  # paired differences, this run minus the uncached one
            assert -1 <= cell[f"{split}_effect_accuracy_diff"] <= 1 and cell[f"{split}_content_fidelity_diff_se"] >= 0
        assert report["table"][f"{m}/seen"]["effect_accuracy_se"] >= 0
    assert "PSNR dB (mean ± SE)" in proc.stdout and " ± " in proc.stdout


def test_mean_se():
    from video2lora.effects.evaluation import mean_se

    assert mean_se([1.0]) == (1.0, 0.0)
    m, se = mean_se([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5 and abs(se - (1 / 3) ** 0.5 / 2) < 1e-12



def test_rows_are_independent_samples(tmp_path):
    """No two rows share a generation seed (else every effect's no-LoRA row would be one video counted again and
    again, and the standard errors would count copies); an effect's rows do not depend on the other effects."""
    from video2lora.effects.evaluation import build_rows

    effects = ["spin+pixelate", "zoom_in+fade_out", "zoom_out+invert"]
    rows = build_rows(str(tmp_path / "a"), 5, effects, 3)
    assert len({r["seed"] for r in rows}) == len(rows) == 9
    by_effect = {e: [(r["prompt"], r["seed"]) for r in rows if r["effect"] == e] for e in effects}
    assert by_effect[effects[0]] != by_effect[effects[1]]  # content drawn per effect, not shared
    alone = build_rows(str(tmp_path / "b"), 5, effects[1:2], 3)
    assert [(r["prompt"], r["seed"]) for r in alone] == by_effect[effects[1]]
    assert build_rows(str(tmp_path / "c"), 6, effects[1:2], 3)[0]["seed"] != alone[0]["seed"]  # a new seed, new rows


def test_rows_with_several_references_of_their_effect(tmp_path):
    """--references-per-row K: each row mixes K clips of its own effect (its single-reference row's clip first, the
    others fresh clips, none shared between rows, none of the scene the row's prompt asks for); prompts and seeds
    stay those of one reference per row. The judge (trained on real clips) names every clip's effect."""
    import numpy as np
    import torch

    from video2lora.effects import judge as ec
    from video2lora.effects.evaluation import build_rows
    from video2lora.video_io import read_video

    effects = ["spin+pixelate", "zoom_out+invert"]
    one = build_rows(str(tmp_path / "one"), 5, effects, 4)
    three = build_rows(str(tmp_path / "three"), 5, effects, 4, references_per_row=3)
    assert [(r["prompt"], r["seed"], r["effect"]) for r in three] == [(r["prompt"], r["seed"], r["effect"]) for r in one]
    assert all(r["reference_uris"] == [r["reference_uri"]] for r in one)
    assert all(len(r["reference_uris"]) == 3 and r["reference_uris"][0] == r["reference_uri"] for r in three)
    assert all(r["prompt"] not in r["reference_prompts"] and len(r["reference_prompts"]) == 3 for r in three)
    uris = [u for r in three for u in r["reference_uris"]]
    assert len(set(uris)) == len(uris) == 24
    clips = [read_video(u, 9, 32, 32) for u in uris]
    assert all(not torch.equal(a, b) for i, a in enumerate(clips) for b in clips[i + 1:])  # other scenes
    assert np.abs(clips[0].numpy() - read_video(one[0]["reference_uri"], 9, 32, 32).numpy()).mean() < 0.01  # mp4
    named = ec.load(os.path.join(ASSETS, "classifier")).predict(torch.stack(clips))["effect"]
    assert list(named) == [r["effect"] for r in three for _ in r["reference_uris"]]
    with pytest.raises(ValueError, match="at least one reference"):
        build_rows(str(tmp_path / "none"), 5, effects, 2, references_per_row=0)


def test_mixed_rows_in_the_manifest_and_on_the_command_line(tmp_path):
    """A mixed row's video2lora sample reads every clip (reference_uris); its no_lora sample (strength 0) and a
    single-reference row read one. The flag takes 1 to 8 (the batch job's mix limit), and --against refuses a run
    made with another number of references per row (other rows)."""
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    import evaluate as ev

    rows = [{"name": "a", "reference_uri": "r0.mp4", "reference_uris": ["r0.mp4", "r1.mp4"], "prompt": "p", "seed": 1},
            {"name": "b", "reference_uri": "s0.mp4", "reference_uris": ["s0.mp4"], "prompt": "q", "seed": 2}]
    m = {x["sample_id"]: x for x in ev.manifest_rows(rows, lora_strength=1.0)}
    assert m["video2lora__a"]["reference_uris"] == ["r0.mp4", "r1.mp4"] and "reference_uri" not in m["video2lora__a"]
    assert m["no_lora__a"]["reference_uri"] == "r0.mp4" and "reference_uris" not in m["no_lora__a"]
    assert m["no_lora__a"]["lora_strength"] == 0.0 and m["video2lora__a"]["lora_strength"] == 1.0
    assert all(m[f"{k}__b"]["reference_uri"] == "s0.mp4" and "reference_uris" not in m[f"{k}__b"]
               for k in ("video2lora", "no_lora"))
    assert ev.parse_args(["--references-per-row", "8"]).references_per_row == 8
    for bad in (["--references-per-row", "0"], ["--references-per-row", "9"],
                ["--references-per-row", "2", "--refine-steps", "4"]):  # refinement takes one reference
        with pytest.raises(SystemExit):
            ev.parse_args(bad)
    assert ev.parse_args(["--refine-steps", "4"]).refine_steps == 4
    # what an evaluation signs: measuring the fit changes no video; refinement and its unfamiliar steps only when on
    from video2lora.config import GenerationConfig

    plain = ev.signed_generation(GenerationConfig())
    assert ev.signed_generation(GenerationConfig(measure_reference_fit=True)) == plain
    assert not any(k.startswith("refine") or k == "measure_reference_fit" for k in plain)
    refined = ev.signed_generation(GenerationConfig(refine_steps=80))
    assert refined["refine_steps"] == 80 and "refine_steps_unfamiliar" not in refined
    assert ev.signed_generation(GenerationConfig(refine_steps=80, refine_steps_unfamiliar=160)) == {
        **refined, "refine_steps_unfamiliar": 160}
    (tmp_path / "results.json").write_text(json.dumps({"rows": []}))  # an earlier run: one reference per row
    ev.check_against(str(tmp_path), 1)
    with pytest.raises(ValueError, match="references per row"):
        ev.check_against(str(tmp_path), 4)


def test_rerun_with_other_rows_makes_its_videos_again(quick_run, tmp_path):
    """The batch job resumes by sample id; an evaluation of other rows (here another seed) into the same --output
    must not take the earlier rows' videos as its own."""
    import shutil

    from video2lora.video_io import read_video

    first, _, report = quick_run
    out = tmp_path / "again"
    shutil.copytree(first, out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--quick", "--seed", "4", "--output", str(out),
                           "--no-per-effect"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "holds an evaluation of other rows" in proc.stderr
    again = json.loads((out / "results.json").read_text())
    old = {r["name"]: r for r in report["rows"] if r["method"] == "no_lora"}
    for r in again["rows"]:
        if r["method"] == "no_lora" and r["name"] in old:
            assert r["seed"] != old[r["name"]]["seed"]
            a, b = read_video(r["video"], 9, 32, 32), read_video(os.path.join(first, "gen", "videos", os.path.basename(r["video"])), 9, 32, 32)
            assert (a - b).abs().mean() > 0.01  # made again from its own seed, not the earlier file
    # the same rows with another sampler: made again too; the same rows and sampler again: resumed, nothing made
    for extra, remade in ((["--step-cache", "magcache"], True), (["--step-cache", "magcache"], False)):
        proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--quick", "--seed", "4", "--output", str(out),
                               "--no-per-effect", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert ("holds an evaluation of other rows" in proc.stderr) is remade
        assert ("8 to do, 0 done earlier" in proc.stderr) is remade and ("0 to do, 8 done earlier" in proc.stderr) is not remade
