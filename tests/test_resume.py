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
