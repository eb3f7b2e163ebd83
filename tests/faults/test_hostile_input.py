"""Hostile input: manifests, clips, checkpoints and LoRA files made by someone else. Each bad row fails alone, with
a reason; nothing is written outside the output prefix; nothing is unpickled; huge clips are refused unread."""

import io
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from faults.helpers import check_final_states, job_config, results_table, write_manifest
from pipelines.batch import SetupError, check_artifacts, run_batch_job
from pipelines.manifest import MAX_PROMPT_CHARS, ManifestError, read_manifest
from video2lora import video_io
from video2lora.video_io import VideoReadError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with almost no pixel data (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory, clips):
    """Files that are not what their names say, or far too big, next to one good clip."""
    d = tmp_path_factory.mktemp("hostile")
    good = open(clips[0], "rb").read()
    files = {
        "random_bytes.mp4": random.Random(0).randbytes(4096),
        "s3_error_page.mp4": b'<?xml version="1.0"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>',
        "truncated.mp4": good[: len(good) // 2],
        "empty.mp4": b"",
        # a real clip, but 4128 x 4128 pixels: over the 4096 x 4096 limit
        "huge_frame.mp4": video_io.encode_video(torch.zeros(3, 1, 4128, 4128)),
        # a real clip of 10001 tiny frames: over the 10000-frame limit
        "too_many_frames.mp4": video_io.encode_video(torch.zeros(3, 10_001, 16, 16)),
        "bomb.png": _png_header_only(50_000, 50_000),
        # an ffmpeg concat script named .mp4: it would have the decoder read other files on the worker
        "concat_script.mp4": b"ffconcat version 1.0\nfile 'ref0.mp4'\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "a_directory.mp4").mkdir()
    return d


def test_hostile_manifest_rows(ray_cluster, tiny_backbone_dir, checkpoint, clips, hostile_files, tmp_path):
    ref = clips[1]
    h = hostile_files
    escape_abs = str(tmp_path / "abs_escape")
    bad_ids = ["/etc/passwd", "../escape", "../../etc/x", escape_abs, "a\x00b", "line\nbreak", "x" * 201, "y" * 195, "ünïcode",
               ".", "..", "sp ace", "a/b", "a\\b"]
    rows = [{"sample_id": s, "reference_uri": ref, "prompt": "x"} for s in bad_ids]
    field_rows = {  # sample_id -> (overrides, words the error must hold)
        "long_prompt": ({"prompt": "p" * (MAX_PROMPT_CHARS + 1)}, [f"{MAX_PROMPT_CHARS + 1} characters"]),
        "neg_steps": ({"steps": -1}, ["steps=-1", "outside"]),
        "nan_steps": ({"steps": math.nan}, ["steps=nan", "not a finite number"]),
        "neg_seed": ({"seed": -5}, ["seed=-5", "outside"]),
        "frac_seed": ({"seed": 1.5}, ["seed=1.5", "not a whole number"]),
        "neg_strength": ({"lora_strength": -1.0}, ["lora_strength=-1.0", "outside"]),
        "nan_strength": ({"lora_strength": math.nan}, ["lora_strength=nan"]),
        "inf_guidance": ({"guidance_scale": math.inf}, ["guidance_scale=inf"]),
        "huge_frames": ({"num_frames": 10**9}, ["num_frames=1000000000", "outside"]),
        "huge_height": ({"height": 10**6}, ["height=1000000", "outside"]),
        "zero_width": ({"width": 0}, ["width=0", "outside"]),
        # each within its own bound, together a video no GPU holds (it would OOM-kill actor after actor)
        "huge_video": ({"num_frames": 1025, "height": 4096, "width": 4096}, ["1025 x 4096 x 4096", "pixels, more than"]),
        "empty_reference": ({"reference_uri": ""}, ["reference_uri is empty"]),
    }
    for sid, (over, _) in field_rows.items():
        rows.append({"sample_id": sid, "reference_uri": ref, "prompt": "x", **over})
    file_rows = {  # sample_id -> (reference file, words the error must hold)
        "random_bytes": ("random_bytes.mp4", ["random_bytes.mp4", "not a readable video"]),
        "s3_error_page": ("s3_error_page.mp4", ["s3_error_page.mp4", "not a readable video"]),
        "truncated": ("truncated.mp4", ["truncated.mp4", "not a readable video"]),
        "empty_file": ("empty.mp4", ["empty.mp4", "empty file"]),
        "huge_frame": ("huge_frame.mp4", ["huge_frame.mp4", "frame size 4128x4128 exceeds the limit"]),
        "too_many_frames": ("too_many_frames.mp4", ["too_many_frames.mp4", "10001 frames exceed the limit of 10000"]),
        "concat_script": ("concat_script.mp4", ["concat_script.mp4", "not a readable video"]),
        "directory": ("a_directory.mp4", ["a_directory.mp4"]),
    }
    for sid, (name, _) in file_rows.items():
        rows.append({"sample_id": sid, "reference_uri": str(h / name), "prompt": "x"})
    rows.append({"sample_id": "image_bomb", "reference_uri": ref, "prompt": "x", "image_uri": str(h / "bomb.png")})
    good = {"plain": "a red circle", "empty_prompt": "", "prompt_at_limit": "q" * MAX_PROMPT_CHARS,
            "odd_prompt": "\u202e\U0001f600 \x00\ttabs\nnewlines \u0000 ' \" ; DROP TABLE"}
    rows += [{"sample_id": sid, "reference_uri": ref, "prompt": p, "seed": 3} for sid, p in good.items()]

    out = tmp_path / "out"
    summary = run_batch_job(write_manifest(tmp_path / "m.parquet", rows),
                            job_config(tiny_backbone_dir, checkpoint, out), progress=False)
    res = check_final_states(results_table(str(out)), [r["sample_id"] for r in rows])
    assert summary["ok"] == len(good) and summary["failed"] == len(rows) - len(good), summary
    assert set(res.index[res.status == "ok"]) == set(good)
    for sid in bad_ids:
        assert res.loc[sid, "status"] == "failed" and "unsafe name" in res.loc[sid, "error"], sid
    for sid, (_, words) in field_rows.items():
        assert res.loc[sid, "status"] == "failed", sid
        for w in words:
            assert w in res.loc[sid, "error"], (sid, res.loc[sid, "error"])
    for sid in [*bad_ids, *field_rows]:  # refused on the driver, before any stage saw them
        assert res.loc[sid, "t_fetch_s"] is None or math.isnan(res.loc[sid, "t_fetch_s"]), sid
    for sid, (_, words) in file_rows.items():
        assert res.loc[sid, "status"] == "failed", sid
        for w in words:
            assert w in res.loc[sid, "error"], (sid, res.loc[sid, "error"])
    assert "bomb.png" in res.loc["image_bomb", "error"]
    assert "exceeds" in res.loc["image_bomb", "error"] or "decompression bomb" in res.loc["image_bomb", "error"]

    # nothing was written outside the output prefix, and nothing but the finished rows inside it
    assert sorted(os.listdir(out / "videos")) == sorted(f"{s}.mp4" for s in good)
    assert sorted(os.listdir(out / "rows")) == sorted(f"{s}.json" for s in good)
    assert sorted(os.listdir(out)) == ["job.json", "results.parquet", "rows", "videos"]
    assert sorted(os.listdir(tmp_path)) == ["m.parquet", "out"]
    assert not os.path.exists(escape_abs + ".mp4") and not os.path.exists("/etc/x.mp4")


def test_huge_clips_are_refused_before_decoding(hostile_files, monkeypatch):
    """The limits are checked from the container's metadata: not one frame of these clips is decoded."""
    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded frames of a clip that should have been refused from its metadata")

    monkeypatch.setattr(video_io, "_decode_selected", must_not_decode)
    with pytest.raises(VideoReadError, match="frame size 4128x4128 exceeds"):
        video_io.decode_video((hostile_files / "huge_frame.mp4").read_bytes(), "huge_frame.mp4", 9, 32, 32)
    with pytest.raises(VideoReadError, match="10001 frames exceed"):
        video_io.decode_video((hostile_files / "too_many_frames.mp4").read_bytes(), "too_many_frames.mp4", 9, 32, 32)
    with pytest.raises(VideoReadError, match="big.png: frame size 5000x5000 exceeds"):  # the header alone is read
        video_io.decode_image(_png_header_only(5000, 5000), "big.png", 32, 32)
    with pytest.raises(VideoReadError, match="bomb.png: corrupt image .*decompression bomb"):
        video_io.decode_image((hostile_files / "bomb.png").read_bytes(), "bomb.png", 32, 32)


def test_a_clip_cannot_make_the_decoder_open_other_files(hostile_files, clips, monkeypatch):
    """An ffconcat script (or HLS playlist) named .mp4 names other files; the decoder must read the clip's own bytes
    only. Here the file it names exists in the working directory, so only the refusal stops it."""
    monkeypatch.chdir(os.path.dirname(clips[0]))
    assert os.path.exists("ref0.mp4")
    with pytest.raises(VideoReadError, match="concat_script.mp4.*not a readable video"):
        video_io.decode_video((hostile_files / "concat_script.mp4").read_bytes(), "concat_script.mp4", 9, 32, 32)
    hls = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\nref0.mp4\n#EXT-X-ENDLIST\n"
    with pytest.raises(VideoReadError, match="playlist.mp4"):
        video_io.decode_video(hls, "playlist.mp4", 9, 32, 32)


class _Trap:
    """Unpickling this creates a marker file: proof that someone unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch_save"])
def test_pickle_checkpoint_refused_never_unpickled(kind, tiny_backbone_dir, checkpoint, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_bytes(open(os.path.join(checkpoint, "config.json"), "rb").read())
    if kind == "pickle":
        data = pickle.dumps({"hypernet.head.weight": _Trap(marker)})
    else:
        buf = io.BytesIO()
        torch.save({"hypernet.head.weight": _Trap(marker)}, buf)
        data = buf.getvalue()
    (bad / "video2lora.safetensors").write_bytes(data)
    cfg = job_config(tiny_backbone_dir, str(bad), tmp_path / "out")
    with pytest.raises(SetupError, match="not a safetensors file.*never unpickle"):
        check_artifacts(cfg)
    # the job itself refuses it up front, before reading any row's files or starting any Ray work
    manifest = write_manifest(tmp_path / "m.parquet", [{"sample_id": "a", "reference_uri": "nowhere.mp4", "prompt": "x"}])
    with pytest.raises(SetupError, match="--checkpoint .*not a safetensors file"):
        run_batch_job(manifest, cfg, progress=False)
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "out" / "videos")


def test_pickle_checkpoint_refused_by_the_job_command(tiny_backbone_dir, checkpoint, clips, tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_bytes(open(os.path.join(checkpoint, "config.json"), "rb").read())
    marker = str(tmp_path / "UNPICKLED")
    (bad / "video2lora.safetensors").write_bytes(pickle.dumps(_Trap(marker)))
    manifest = write_manifest(tmp_path / "m.parquet", [{"sample_id": "a", "reference_uri": clips[0], "prompt": "x"}])
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # the job script would connect before it looks at the checkpoint
    run = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "batch_generate.py"), manifest, "--output",
                          str(tmp_path / "out"), "--backbone", tiny_backbone_dir, "--checkpoint", str(bad), "--quiet"],
                         env=env, capture_output=True, timeout=300)
    err = run.stderr.decode()
    assert run.returncode != 0
    assert "not a safetensors file (we never unpickle weights" in err, err[-2000:]
    assert "Started a local Ray instance" not in err  # refused before any Ray work
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out" / "videos")


def test_backbone_with_pickled_weights_is_refused_never_unpickled(tiny_backbone_dir, tmp_path):
    import shutil

    from video2lora.backbones import Backbone

    bad = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_dir, bad)
    marker = str(tmp_path / "UNPICKLED")
    for f in (bad / "transformer").glob("*.safetensors"):
        f.unlink()
    buf = io.BytesIO()
    torch.save({"proj_out.weight": _Trap(marker)}, buf)  # what a .bin checkpoint from the hub would look like
    (bad / "transformer" / "diffusion_pytorch_model.bin").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="cannot load the backbone pipeline with safetensors weights"):
        Backbone.from_pretrained(str(bad), device="cpu")
    assert not os.path.exists(marker)


def test_checkpoint_that_does_not_match_its_config(tiny_backbone_dir, checkpoint, tmp_path):
    from safetensors.torch import load, save

    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_bytes(open(os.path.join(checkpoint, "config.json"), "rb").read())
    state = load(open(os.path.join(checkpoint, "video2lora.safetensors"), "rb").read())
    state["hypernet.head.weight"] = torch.zeros(3, 3)
    state["surprise"] = torch.zeros(1)
    (bad / "video2lora.safetensors").write_bytes(save(state))
    with pytest.raises(SetupError, match="does not match its config.*surprise.*hypernet.head.weight"):
        check_artifacts(job_config(tiny_backbone_dir, str(bad), tmp_path / "out"))
    (bad / "config.json").write_bytes(b"{not json")
    with pytest.raises(SetupError, match="not a Video2LoRA config"):
        check_artifacts(job_config(tiny_backbone_dir, str(bad), tmp_path / "out"))
    with pytest.raises(SetupError, match="not a diffusers pipeline directory"):
        check_artifacts(job_config(str(tmp_path), checkpoint, tmp_path / "out"))


@pytest.fixture(scope="module")
def lora_file(tiny_backbone_dir, checkpoint):
    from video2lora.export import export_lora_bytes
    from video2lora.hypernet import Video2LoRAModel

    model = Video2LoRAModel.from_pretrained(checkpoint)
    lc = model.config.lora
    n = len(model.config.layers)
    data = export_lora_bytes(model, torch.randn(n, lc.rank, lc.down), torch.randn(n, lc.up, lc.rank))
    return data, [tuple(l) for l in model.config.layers], lc.rank


def test_lora_file_with_unexpected_keys_or_shapes(lora_file, tmp_path):
    from safetensors.torch import load, save

    from video2lora.export import check_lora_file

    data, layers, rank = lora_file
    state = check_lora_file(data, "good.safetensors", layers, rank)
    key = sorted(state)[0]

    extra = dict(state, **{"transformer.evil.lora_A.weight": torch.zeros(rank, 4)})
    with pytest.raises(ValueError, match="extra.safetensors: LoRA keys do not fit this backbone: unexpected .*evil"):
        check_lora_file(save(extra), "extra.safetensors", layers, rank)
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match="missing.safetensors: .*missing .*" + key.split(".")[1]):
        check_lora_file(save(missing), "missing.safetensors", layers, rank)
    reshaped = dict(state, **{key: torch.zeros(rank + 1, 3)})
    with pytest.raises(ValueError, match=f"shape.safetensors: {key} has shape \\({rank + 1}, 3\\), expected"):
        check_lora_file(save(reshaped), "shape.safetensors", layers, rank)
    with pytest.raises(ValueError, match="pickled.safetensors: not a safetensors file"):
        check_lora_file(pickle.dumps(load(data)), "pickled.safetensors", layers, rank)
    with pytest.raises(ValueError, match="cut.safetensors: corrupt safetensors file"):
        check_lora_file(data[: len(data) // 2], "cut.safetensors", layers, rank)
    huge_header = struct.pack("<Q", 2**62) + b"{" + data[9:]  # claims an exabyte-sized header
    with pytest.raises(ValueError, match="huge.safetensors: corrupt safetensors file"):
        check_lora_file(huge_header, "huge.safetensors", layers, rank)


def test_manifest_level_hostility_stops_before_work(tmp_path):
    with pytest.raises(ManifestError, match="no sample_id"):
        read_manifest(write_manifest(tmp_path / "a.parquet", [{"sample_id": "", "reference_uri": "x", "prompt": "p"}]))
    with pytest.raises(ManifestError, match="'sample_id' has type int64"):
        read_manifest(write_manifest(tmp_path / "b.parquet", [{"sample_id": 7, "reference_uri": "x", "prompt": "p"}]))
    (tmp_path / "c.parquet").write_bytes(pickle.dumps({"sample_id": "a"}))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(str(tmp_path / "c.parquet"))
