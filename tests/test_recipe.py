"""jobs/recipe.py: which commands each stage runs, per world (the stages themselves are tested where they live)."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "jobs"))

import recipe  # noqa: E402


@pytest.fixture
def commands(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(recipe, "run", lambda cmd, env=None: ran.append(cmd))
    prepared = tmp_path / "train" / "prepared" / "abc"
    prepared.mkdir(parents=True)
    (prepared / "prepared.json").write_text("{}")
    return ran


def paths_for(tmp_path):
    out = str(tmp_path)
    return {"data": f"{out}/data", "judge_train": f"{out}/cd", "judge_test": f"{out}/ct", "backbone": f"{out}/backbone",
            "classifier": f"{out}/classifier", "train": f"{out}/train", "checkpoint": f"{out}/checkpoint",
            "final": f"{out}/train/final", "warmstart": f"{out}/warmstart", "baselines": f"{out}/b.safetensors",
            "select": f"{out}/select", "evaluate": f"{out}/evaluate"}


def run_stages(a, tmp_path) -> dict:
    """The stages that only build commands (data, pretrain, warmstart, train, evaluate), in order; their paths."""
    p = paths_for(tmp_path)
    for stage in ("data", "pretrain", "warmstart", "train", "evaluate"):
        getattr(recipe, f"stage_{stage}")(a, p)
    return p


def arg(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_combo_world_extends_the_backbone_and_factorises_the_warm_start(commands, tmp_path):
    a = recipe.parse_args(["--world", "combo", "--out", str(tmp_path), "--init-backbone", "/fx/backbone"])
    p = run_stages(a, tmp_path)
    data, judge_train, judge_test, pretrain, warm, train, evaluate = commands
    assert arg(data, "--effects") == "combo" and arg(judge_train, "--effects") == "combo-world"
    assert arg(pretrain, "--init") == "/fx/backbone" and arg(pretrain, "--vae-steps") == "0"
    assert arg(pretrain, "--effects") == "combo-world"
    assert "--factorise" in warm and json.loads(arg(warm, "--model-config"))["lora"]["rank"] == 2
    assert arg(warm, "--table-steps") == "2000"
    # compounds read standardised frames (a look's colour or brightness change hid the motion: docs/EFFECTS.md)
    assert json.loads(arg(warm, "--model-config"))["hyper"]["reference_features"] == ["frame_norm"]
    assert arg(evaluate, "--effects") == "combo-eval"
    # one end-to-end run of 2000 steps (the shipped checkpoint's budget), every checkpoint kept for the select stage
    assert arg(train, "--max-steps") == "2000" and arg(train, "--checkpoint-every") == "500"
    assert arg(train, "--keep-checkpoints") == "4" and arg(train, "--output") == p["final"]
    assert arg(evaluate, "--seed") == "202" and arg(evaluate, "--refs-per-effect") == "8"  # the test seed
    commands.clear()  # without --init-backbone: the whole backbone from scratch, on every label of the world
    recipe.stage_pretrain(recipe.parse_args(["--world", "combo", "--out", str(tmp_path)]), p)
    assert "--init" not in commands[0] and arg(commands[0], "--effects") == "combo-world"
    assert arg(commands[0], "--vae-minutes") == "8.0"


def test_train_parts_adds_the_parts_alone_to_the_hypernetworks_clips_only(commands, tmp_path, capsys):
    a = recipe.parse_args(["--world", "combo", "--out", str(tmp_path), "--train-parts"])
    run_stages(a, tmp_path)
    data, judge_train, judge_test, pretrain, warm, train, evaluate = commands
    assert arg(data, "--effects") == "combo-with-parts" and arg(data, "--train-labels") == "combo-parts"
    assert "--train-labels" not in judge_train and arg(judge_train, "--effects") == "combo-world"
    assert "--factorise" in warm and arg(evaluate, "--effects") == "combo-eval"  # evaluated as without
    commands.clear()
    assert recipe.main(["--world", "families", "--out", str(tmp_path / "f"), "--train-parts"]) == 2
    assert "--train-parts" in capsys.readouterr().err
    run = tmp_path / "run"  # a run's data lacks the parts: a rerun with them would mix the two
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"args": {"world": "combo", "reference_features": "frame_norm"}}))
    assert recipe.main(["--world", "combo", "--out", str(run), "--train-parts", "--only", "train"]) == 2
    assert "without --train-parts" in capsys.readouterr().err and commands == []
    # a run recorded before --train-parts existed (no such key) goes on without it
    a = recipe.parse_args(["--world", "combo", "--out", str(run)])
    assert recipe.refusal(a, paths_for(run), str(run), list(recipe.STAGES), str(run / "recipe.json")) == ""


def test_motion_stream_and_tables_from_reach_the_warm_start_only(commands, tmp_path, capsys):
    a = recipe.parse_args(["--world", "combo", "--out", str(tmp_path), "--motion-stream", "--tables-from", "/r/warmstart"])
    run_stages(a, tmp_path)
    data, judge_train, judge_test, pretrain, warm, train, evaluate = commands
    assert json.loads(arg(warm, "--model-config"))["hyper"]["motion_stream"] is True
    assert arg(warm, "--tables-from") == "/r/warmstart" and "--factorise" in warm
    assert all("--tables-from" not in c and "--model-config" not in c for c in commands if c is not warm)
    commands.clear()
    recipe.stage_warmstart(recipe.parse_args(["--world", "combo", "--out", str(tmp_path)]), paths_for(tmp_path))
    assert json.loads(arg(commands[0], "--model-config"))["hyper"]["motion_stream"] is False
    assert "--tables-from" not in commands[0]
    commands.clear()
    assert recipe.main(["--out", str(tmp_path / "s"), "--motion-stream"]) == 2  # single effects: no motion half
    assert "--motion-stream" in capsys.readouterr().err
    run = tmp_path / "run"  # a run without the motion stream: a rerun with it would mix the two
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"args": {"world": "combo", "reference_features": "frame_norm"}}))
    assert recipe.main(["--world", "combo", "--out", str(run), "--motion-stream", "--only", "train"]) == 2
    assert "without --motion-stream" in capsys.readouterr().err and commands == []


def test_train_seed_reaches_the_warm_start_and_training_and_is_never_mixed_in_one_out(commands, tmp_path, capsys):
    """Another --train-seed is another sample of the same run (the validation score of one recipe spread 0.22-0.29
    over three runs: docs/measurements/rerun_2026-12-08): it seeds both the warm start and the end-to-end run."""
    run_stages(recipe.parse_args(["--world", "combo", "--out", str(tmp_path), "--train-seed", "3"]), tmp_path)
    data, judge_train, judge_test, pretrain, warm, train, evaluate = commands
    assert arg(warm, "--seed") == "3" and arg(train, "--seed") == "3"
    assert arg(evaluate, "--seed") == "202"  # the rows evaluated stay the same
    commands.clear()
    run_stages(recipe.parse_args(["--world", "combo", "--out", str(tmp_path)]), tmp_path)
    assert arg(commands[4], "--seed") == "0" and arg(commands[5], "--seed") == "0"  # as before the flag
    commands.clear()
    run = tmp_path / "run"  # a run recorded before the flag existed is seed 0
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"args": {"world": "combo", "reference_features": "frame_norm"}}))
    assert recipe.main(["--world", "combo", "--out", str(run), "--train-seed", "1", "--only", "train"]) == 2
    assert "--train-seed 0" in capsys.readouterr().err and commands == []


def test_family_world_extends_the_backbone_to_every_family_label(commands, tmp_path):
    a = recipe.parse_args(["--world", "families", "--out", str(tmp_path), "--init-backbone", "/fx/backbone"])
    p = run_stages(a, tmp_path)
    data, judge_train, judge_test, pretrain, warm, train, evaluate = commands
    # the hypernetwork's clips hold every evaluated effect (its training keeps split "train"; the baselines need all)
    assert arg(data, "--effects") == "families" and arg(judge_train, "--effects") == "families-world"
    assert arg(pretrain, "--effects") == "families-world" and arg(pretrain, "--init") == "/fx/backbone"
    assert "--factorise" in warm and json.loads(arg(warm, "--model-config"))["lora"]["rank"] == 2
    assert json.loads(arg(warm, "--model-config"))["hyper"]["reference_features"] == ["latent"]  # as measured
    assert arg(train, "--max-steps") == "2000" and arg(evaluate, "--effects") == "families-eval"


def test_single_world_is_unchanged(commands, tmp_path):
    a = recipe.parse_args(["--out", str(tmp_path)])
    p = run_stages(a, tmp_path)
    data, judge_train, _, pretrain, warm, train, evaluate = commands
    assert arg(data, "--effects") == "all" and "none" in arg(judge_train, "--effects").split(",")
    assert "--init" not in pretrain and arg(pretrain, "--vae-minutes") == "8.0"
    assert "--factorise" not in warm and "lora" not in json.loads(arg(warm, "--model-config"))
    assert json.loads(arg(warm, "--model-config"))["hyper"]["reference_features"] == ["latent"]
    assert arg(warm, "--table-steps") == "800" and arg(evaluate, "--effects") == "all"
    assert arg(train, "--max-steps") == "1000" and arg(train, "--keep-checkpoints") == "2"


def test_reference_features_are_checked_before_any_stage(commands, tmp_path, capsys):
    """--reference-features latent reproduces the runs before frame_norm; a name the hypernetwork does not know is
    refused before any stage runs, naming the flag."""
    p = paths_for(tmp_path)
    recipe.stage_warmstart(recipe.parse_args(["--world", "combo", "--reference-features", "latent"]), p)
    recipe.stage_warmstart(recipe.parse_args(["--world", "families", "--reference-features", " frame_norm, correlation"]), p)
    assert [json.loads(arg(c, "--model-config"))["hyper"]["reference_features"] for c in commands] == [
        ["latent"], ["frame_norm", "correlation"]]
    commands.clear()
    assert recipe.main(["--world", "combo", "--out", str(tmp_path / "r"), "--reference-features", "flow"]) == 2
    assert "--reference-features" in capsys.readouterr().err and commands == []
    run = tmp_path / "run"  # a run's warm start read the latent: a rerun with the default would reuse it silently
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"args": {"world": "combo", "reference_features": "latent"}}))
    assert recipe.main(["--world", "combo", "--out", str(run), "--only", "train"]) == 2
    assert "reading latent" in capsys.readouterr().err and commands == []


def test_refuses_to_mix_worlds_or_start_from_its_own_backbone(commands, tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe.main(["--world", "combo", "--out", str(out), "--init-backbone", str(out / "backbone")]) == 2
    assert "own backbone" in capsys.readouterr().err
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"args": {"world": "single"}}))
    assert recipe.main(["--world", "combo", "--out", str(out), "--only", "data"]) == 2
    assert "--world single run" in capsys.readouterr().err
    assert recipe.main(["--world", "families", "--out", str(tmp_path / "f"), "--ship"]) == 2  # only combo ships
    assert "only --world combo ships" in capsys.readouterr().err
    assert commands == []  # nothing ran


def test_a_given_backbone_and_judge_are_used_as_they_are(commands, tmp_path, capsys):
    backbone, judge = tmp_path / "bb", tmp_path / "judge"
    backbone.mkdir()
    judge.mkdir()
    (backbone / "model_index.json").write_text("{}")
    (judge / "config.json").write_text("{}")
    out = tmp_path / "run"
    assert recipe.main(["--world", "combo", "--out", str(out), "--backbone", str(backbone), "--classifier", str(judge),
                        "--only", "data,pretrain,judge"]) == 0
    assert len(commands) == 1 and arg(commands[0], "--effects") == "combo"  # no judge clips: the judge is given
    assert "pretrain: given" in capsys.readouterr().out
    (out / "data").mkdir()
    (out / "data" / "clips.parquet").write_text("")  # the hypernetwork's clips are all the data stage makes here
    assert recipe.main(["--world", "combo", "--out", str(out), "--backbone", str(backbone), "--classifier", str(judge),
                        "--only", "data"]) == 0
    assert "data: done earlier" in capsys.readouterr().out
    assert recipe.main(["--out", str(out), "--backbone", str(backbone), "--init-backbone", str(backbone)]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert recipe.main(["--out", str(out), "--backbone", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert len(commands) == 1


def test_select_compares_every_checkpoint_on_the_validation_seed_only(monkeypatch, tmp_path):
    from video2lora.effects.evaluation import ROW_PROTOCOL
    from video2lora.effects.world import resolve_effects

    p = paths_for(tmp_path)
    accuracy = {500: (0.2, 0.1), 1000: (0.4, 0.2), 1500: (0.2, 0.4), 2000: (0.3, 0.1)}  # 1000 and 1500 tie: 0.3
    for step in accuracy:
        model = tmp_path / "train" / recipe.RUN_NAME / f"checkpoint-{step:09d}" / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"step": step}))
    seeds = []

    def fake_evaluate(cmd, env=None):
        seeds.append(arg(cmd, "--seed"))
        assert "--no-per-effect" in cmd and arg(cmd, "--step-cache") == "none"  # the method on the exact sampler
        step = json.loads(open(os.path.join(arg(cmd, "--checkpoint"), "config.json")).read())["step"]
        seen, held = accuracy[step]
        cell = lambda acc: {"rows": 56, "effect_accuracy": acc, "effect_accuracy_se": 0.05,  # noqa: E731
                            "content_fidelity": 0.7, "content_fidelity_se": 0.02}
        os.makedirs(arg(cmd, "--output"))
        with open(os.path.join(arg(cmd, "--output"), "results.json"), "w") as f:
            json.dump({"checkpoint": arg(cmd, "--checkpoint"), "refs_per_effect": int(arg(cmd, "--refs-per-effect")),
                       "effects": resolve_effects(arg(cmd, "--effects")), "row_protocol": ROW_PROTOCOL,
                       "table": {"video2lora/seen": cell(seen), "video2lora/held-out": cell(held),
                                 "no_lora/seen": cell(0.0), "no_lora/held-out": cell(0.0)}}, f)

    monkeypatch.setattr(recipe, "run", fake_evaluate)
    recipe.stage_select(recipe.parse_args(["--world", "combo", "--val-seed", "11", "--test-seed", "13"]), p)
    assert seeds == ["11"] * 4  # never the test seed
    chosen = json.loads(open(os.path.join(p["checkpoint"], "config.json")).read())
    assert chosen == {"step": 1000}  # best mean of seen and held-out; the tie goes to fewer steps
    report = json.loads(open(os.path.join(p["select"], "selection.json")).read())
    assert report["chosen_step"] == 1000 and [c["step"] for c in report["candidates"]] == [500, 1000, 1500, 2000]
    assert "step 1000 (chosen)" in open(os.path.join(p["select"], "selection.md")).read()
    # a rerun reuses what scored these very checkpoints; another validation seed, effect set or --force scores again
    recipe.stage_select(recipe.parse_args(["--world", "combo", "--val-seed", "11"]), p)
    assert seeds == ["11"] * 4
    recipe.stage_select(recipe.parse_args(["--world", "combo", "--val-seed", "12"]), p)
    assert seeds == ["11"] * 4 + ["12"] * 4
    recipe.stage_select(recipe.parse_args(["--world", "combo", "--val-seed", "12", "--force"]), p)
    assert seeds == ["11"] * 4 + ["12"] * 8
    # a score drawn under an earlier row protocol (rows that shared content and seeds) is not reused
    done = os.path.join(p["select"], "seed-12", "step-500", "results.json")
    with open(done) as f:
        old = json.load(f)
    with open(done, "w") as f:
        json.dump({**old, "row_protocol": ROW_PROTOCOL - 1}, f)
    recipe.stage_select(recipe.parse_args(["--world", "combo", "--val-seed", "12"]), p)
    assert seeds == ["11"] * 4 + ["12"] * 9
    recipe.stage_select(recipe.parse_args(["--world", "families", "--val-seed", "12"]), p)
    assert seeds == ["11"] * 4 + ["12"] * 13


def test_ship_can_reuse_the_shipped_backbone_it_replaces(monkeypatch, tmp_path):
    root = tmp_path / "repo"
    assets = root / "video2lora" / "assets" / "checkpoint"
    (assets / "backbone").mkdir(parents=True)
    (assets / "backbone" / "model_index.json").write_text("the shipped backbone")
    (assets / "video2lora.safetensors").write_text("old")
    run, p = tmp_path / "run", {}
    for sub, names in (("checkpoint", ("config.json", "video2lora.safetensors")),
                       ("classifier", ("config.json", "model.safetensors", "report.json"))):
        (run / sub).mkdir(parents=True)
        for n in names:
            (run / sub / n).write_text(f"new {n}")
        p[sub] = str(run / sub)
    (run / "b.safetensors").write_text("baselines")
    p.update(backbone=str(assets / "backbone"), baselines=str(run / "b.safetensors"))
    monkeypatch.setattr(recipe, "ROOT", str(root))
    recipe.ship(p)
    assert (assets / "backbone" / "model_index.json").read_text() == "the shipped backbone"
    assert (assets / "video2lora.safetensors").read_text() == "new video2lora.safetensors"
    assert (assets / "baselines" / "b.safetensors").read_text() == "baselines"
    assert not (assets.parent / "checkpoint.new").exists()
