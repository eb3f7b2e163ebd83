"""jobs/pretrain_backbone.py refuses bad flags before any work, naming the flag and the bad value."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "jobs"))

import pretrain_backbone  # noqa: E402


def test_bad_flags_are_refused_up_front(tmp_path, capsys):
    out = str(tmp_path / "bb")
    assert pretrain_backbone.main(["--out", out, "--effects", "spin,spin+wobble"]) == 2
    err = capsys.readouterr().err
    assert "--effects" in err and "spin+wobble" in err
    assert pretrain_backbone.main(["--out", out, "--vae-steps", "0"]) == 2  # a fresh VAE must be trained
    assert "--init" in capsys.readouterr().err
    assert not os.path.exists(out)
