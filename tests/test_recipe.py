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
            "warmstart": f"{out}/warmstart", "baselines": f"{out}/b.safetensors", "evaluate": f"{out}/evaluate"}


def arg(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_combo_world_extends_the_backbone_and_factorises_the_warm_start(commands, tmp_path):
    a = recipe.parse_args(["--world", "combo", "--out", str(tmp_path), "--init-backbone", "/fx/backbone"])
    p = paths_for(tmp_path)
    for stage in ("data", "pretrain", "warmstart", "evaluate"):
        getattr(recipe, f"stage_{stage}")(a, p)
    data, judge_train, judge_test, pretrain, warm, evaluate = commands
    assert arg(data, "--effects") == "combo" and arg(judge_train, "--effects") == "combo-world"
    assert arg(pretrain, "--init") == "/fx/backbone" and arg(pretrain, "--vae-steps") == "0"
    assert arg(pretrain, "--effects") == "combo-world"
    assert "--factorise" in warm and json.loads(arg(warm, "--model-config"))["lora"]["rank"] == 2
    assert arg(warm, "--table-steps") == "2000"
    assert arg(evaluate, "--effects") == "combo-eval"
    commands.clear()  # without --init-backbone: the whole backbone from scratch, on every label of the world
    recipe.stage_pretrain(recipe.parse_args(["--world", "combo", "--out", str(tmp_path)]), p)
    assert "--init" not in commands[0] and arg(commands[0], "--effects") == "combo-world"
    assert arg(commands[0], "--vae-minutes") == "8.0"


def test_single_world_is_unchanged(commands, tmp_path):
    a = recipe.parse_args(["--out", str(tmp_path)])
    p = paths_for(tmp_path)
    for stage in ("data", "pretrain", "warmstart", "evaluate"):
        getattr(recipe, f"stage_{stage}")(a, p)
    data, judge_train, _, pretrain, warm, evaluate = commands
    assert arg(data, "--effects") == "all" and "none" in arg(judge_train, "--effects").split(",")
    assert "--init" not in pretrain and arg(pretrain, "--vae-minutes") == "8.0"
    assert "--factorise" not in warm and "lora" not in json.loads(arg(warm, "--model-config"))
    assert arg(warm, "--table-steps") == "800" and arg(evaluate, "--effects") == "all"


def test_refuses_to_mix_worlds_or_start_from_its_own_backbone(commands, tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe.main(["--world", "combo", "--out", str(out), "--init-backbone", str(out / "backbone")]) == 2
    assert "own backbone" in capsys.readouterr().err
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"args": {"world": "single"}}))
    assert recipe.main(["--world", "combo", "--out", str(out), "--only", "data"]) == 2
    assert "--world single run" in capsys.readouterr().err
    assert commands == []  # nothing ran
