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
