"""Resume reads the results table once and only the row records written after it, in one batch."""

import json


from pipelines import batch
from pipelines.stages import RESULT_COLUMNS


def test_resume_reads_only_the_records_the_table_lacks(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    (out / "videos").mkdir()
    rows = {f"r{i}": {c: None for c in RESULT_COLUMNS} | {"sample_id": f"r{i}", "status": "ok",
                                                         "output_uri": str(out / "videos" / f"r{i}.mp4")}
            for i in range(6)}
    for sid, rec in rows.items():
        (out / "rows" / f"{sid}.json").write_text(json.dumps(rec))
        (out / "videos" / f"{sid}.mp4").write_bytes(b"mp4")
    (out / "rows" / "broken.json").write_text("{not json")
    table = {sid: rec for sid, rec in rows.items() if sid in ("r0", "r1", "r2")}
    table["r3"] = rows["r3"] | {"status": "failed"}  # failed in the table, made later by a killed run
    batch.write_results(str(out), table)

    asked = []

    from video2lora import storage

    original = storage.read_many

    def counting(uris):
        asked.append(sorted(u.rsplit("/", 1)[-1] for u in uris))
        return original(uris)

    monkeypatch.setattr("video2lora.storage.read_many", counting)
    done = batch.load_previous_results(str(out))
    assert asked == [["broken.json", "r3.json", "r4.json", "r5.json"]]  # one batch, no ok row twice
    assert sorted(done) == [f"r{i}" for i in range(6)] and all(r["status"] == "ok" for r in done.values())
    assert batch.finished_videos(str(out)) == {str(out / "videos" / f"r{i}.mp4") for i in range(6)}


def test_the_manifest_is_read_a_batch_of_rows_at_a_time(tmp_path):
    """The driver checks a manifest from its sample_id column, then reads its rows in batches as it cuts generation
    blocks: the first block is ready after one batch of rows, not after the whole manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.config import BatchJobConfig
    from video2lora.config import GenerationConfig

    n = 10_000
    ids = [f"r{i:05d}" for i in range(n)]
    pq.write_table(pa.table({"sample_id": ids, "reference_uri": ["clips/a.mp4"] * n, "prompt": ["p"] * n,
                             "seed": [None if i == 7 else i for i in range(n)],
                             "steps": [0 if i == 5 else None for i in range(n)]}),  # row 5: steps out of range
                   tmp_path / "m.parquet", row_group_size=1000)
    cfg = BatchJobConfig(output=str(tmp_path / "out"), batch_size=4,
                         generation=GenerationConfig(num_frames=9, height=32, width=32, steps=2))
    manifest, settled = batch.plan_job(str(tmp_path / "m.parquet"), cfg)
    assert manifest.ids == ids and settled == {}
    settled = {"r00001": {"sample_id": "r00001", "status": "skipped"}}  # as if done earlier
    read = []
    original = manifest.batches

    def counting():
        for rows in original():
            read.append(len(rows))
            yield rows

    manifest.batches = counting
    blocks = batch.planned_blocks(manifest, settled, cfg)
    first = next(blocks)
    assert read == [1000]  # one batch of rows read (a row group here, at most 4,096), not 10,000
    assert first["sample_id"].tolist() == ["r00000", "r00002", "r00003", "r00004"]  # done and refused rows left out
    assert list(first["reference_uris"].iloc[0]) == [str(tmp_path / "clips" / "a.mp4")]  # relative to the manifest
    rest = list(blocks)
    assert "steps" in settled["r00005"]["error"] and settled["r00005"]["status"] == "failed"
    assert sum(read) == n and sum(len(b) for b in [first, *rest]) == n - 2
    assert all(len(b) == 4 for b in rest[:-1])
    seeds = {r["sample_id"]: r["seed"] for b in rest for r in b.to_dict("records")}
    assert seeds["r00007"] == cfg.generation.seed and seeds["r00008"] == 8  # null: the job's default


def _plan(manifest_uri, cfg, results=None):
    """Fingerprints of the manifest's rows as the job plans them (no Ray): sample_id -> fingerprint."""
    manifest, settled = batch.plan_job(manifest_uri, cfg)
    settled.update(results or {})
    planned = {r["sample_id"]: r["row_fingerprint"] for b in batch.planned_blocks(manifest, settled, cfg)
               for r in b.to_dict("records")}
    return planned, settled


def _done(fingerprints, out):
    return {sid: {c: None for c in RESULT_COLUMNS} | {"sample_id": sid, "status": "skipped", "row_fingerprint": f,
                                                     "output_uri": str(out / "videos" / f"{sid}.mp4")}
            for sid, f in fingerprints.items()}


def test_fingerprints_hold_across_spellings_and_name_what_changed(tmp_path, monkeypatch, tiny_backbone_dir):
    """A row's fingerprint does not depend on how the manifest's path or the models' directories are spelt (a Ray
    job unpacks the repository somewhere new each time), nor on job defaults a row overrides, nor on settings its
    step cache does not read; a changed prompt or step cache changes it, and the planning then stops, naming the
    rows. With redo_changed their old records go, so a failed remake is retried later."""
    import shutil

    import pandas as pd
    import pytest

    from pipelines.config import BatchJobConfig
    from pipelines.fingerprint import backbone_identity, checkpoint_identity
    from video2lora.config import GenerationConfig
    from conftest import save_model_for

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"sample_id": f"s{i}", "reference_uri": f"clips/c{i}.mp4", "prompt": "a red circle", "seed": i}
            for i in range(3)]
    pd.DataFrame(rows).to_parquet(data / "m.parquet", index=False)
    out = tmp_path / "out"
    ckpt = save_model_for(tiny_backbone_dir, str(tmp_path / "ckpt"))
    cfg = BatchJobConfig(output=str(out), backbone=tiny_backbone_dir, checkpoint=ckpt,
                         generation=GenerationConfig(num_frames=9, height=32, width=32, steps=2))
    first, _ = _plan(str(data / "m.parquet"), cfg)
    assert len(set(first.values())) == 3

    moved_backbone, moved_ckpt = shutil.copytree(tiny_backbone_dir, tmp_path / "bb"), shutil.copytree(ckpt, tmp_path / "ck")
    assert backbone_identity(str(moved_backbone)) == backbone_identity(tiny_backbone_dir)
    assert checkpoint_identity(str(moved_ckpt)) == checkpoint_identity(ckpt)
    monkeypatch.chdir(tmp_path)
    same = BatchJobConfig(output=str(out), backbone=str(moved_backbone), checkpoint=str(moved_ckpt) + "/",
                          generation=GenerationConfig(num_frames=9, height=32, width=32, steps=2, seed=99,
                                                      step_cache="magcache", step_cache_threshold=0.3))
    todo, _ = _plan("data/m.parquet", same, _done(first, out))  # another spelling of every path
    assert todo == {}
    none = BatchJobConfig(output=str(out), generation=GenerationConfig(num_frames=9, height=32, width=32, step_cache="none"))
    with_threshold = BatchJobConfig(output=str(out), generation=GenerationConfig(
        num_frames=9, height=32, width=32, step_cache="none", step_cache_threshold=0.7))
    assert _plan("data/m.parquet", none)[0] == _plan("data/m.parquet", with_threshold)[0]  # none reads no threshold

    rows[1]["prompt"] = "a blue square"
    pd.DataFrame(rows).to_parquet(data / "m.parquet", index=False)
    with pytest.raises(batch.ChangedRows, match=r"1 row\(s\).*'s1'"):
        _plan("data/m.parquet", same, _done(first, out))
    other_cache = BatchJobConfig(**{**same.__dict__, "generation": GenerationConfig(
        num_frames=9, height=32, width=32, steps=2, step_cache="first_block")})
    with pytest.raises(batch.ChangedRows, match=r"3 row\(s\)"):
        _plan("data/m.parquet", other_cache, _done(first, out))

    (out / "rows").mkdir(parents=True)
    (out / "rows" / "s1.json").write_text(json.dumps({"sample_id": "s1", "status": "ok", "row_fingerprint": first["s1"]}))
    redo = BatchJobConfig(**{**same.__dict__, "redo_changed": True})
    todo, settled = _plan("data/m.parquet", redo, _done(first, out))
    assert list(todo) == ["s1"] and "s1" not in settled and not (out / "rows" / "s1.json").exists()


def test_the_driver_reads_the_checkpoint_weights_once(tmp_path, monkeypatch, tiny_backbone_dir):
    """check_artifacts loads the checkpoint and hands on its identity, so planning the rows does not read the
    weights again (155-310 MB at 5B, from S3), and the rows' fingerprints are the same as when planning reads them."""
    import pandas as pd

    from pipelines.config import BatchJobConfig
    from video2lora import storage
    from video2lora.config import GenerationConfig
    from video2lora.hypernet import WEIGHTS_NAME
    from conftest import save_model_for

    pd.DataFrame([{"sample_id": f"s{i}", "reference_uri": f"c{i}.mp4", "prompt": "a red circle"} for i in range(3)]
                 ).to_parquet(tmp_path / "m.parquet", index=False)
    ckpt = save_model_for(tiny_backbone_dir, str(tmp_path / "ckpt"))
    cfg = BatchJobConfig(output=str(tmp_path / "out"), backbone=tiny_backbone_dir, checkpoint=ckpt,
                         generation=GenerationConfig(num_frames=9, height=32, width=32, steps=2))
    expected, _ = _plan(str(tmp_path / "m.parquet"), cfg)
    weights_read = []
    original = storage.read_bytes

    def counting(uri):
        weights_read.extend([uri] if uri.endswith(WEIGHTS_NAME) else [])
        return original(uri)

    monkeypatch.setattr("video2lora.storage.read_bytes", counting)
    monkeypatch.setattr("pipelines.fingerprint.read_bytes", counting)
    manifest, settled = batch.plan_job(str(tmp_path / "m.parquet"), cfg)
    checkpoint_id = batch.check_artifacts(cfg)
    planned = {r["sample_id"]: r["row_fingerprint"]
               for b in batch.planned_blocks(manifest, settled, cfg, checkpoint_id) for r in b.to_dict("records")}
    assert len(weights_read) == 1 and planned == expected
