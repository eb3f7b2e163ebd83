"""Batch generation on Ray Data, the driver: manifest rows in, one mp4 per row out, resumable.

read manifest -> fetch + decode references (CPU tasks) -> hypernetwork stage (actor pool, LoRAs in batches,
identical references encoded once) -> generation stage (actor pool, the DiT resident, one LoRA per row in one
forward) -> encode + write mp4 (CPU tasks) -> results. The stages are in pipelines/stages.py; every stage catches
errors per row: a bad row ends as `failed` with its reason and the others go on. Ray Data streams, so the
hypernetwork runs ahead of generation. Rows are checked here, once: the stages get typed settings columns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time

import pandas as pd

from pipelines.common import SetupError, error_text, init_ray
from pipelines.config import BatchJobConfig, with_placement
from pipelines.fingerprint import job_signature, row_fingerprint
from pipelines.gallery import JOB_NAME
from pipelines.manifest import Manifest, refine_refusal
from pipelines.metrics import JobMetrics
from pipelines.stages import RESULT_COLUMNS, GenerateStage, HypernetStage, fetch_and_decode, write_videos
from video2lora.storage import exists, join, read_bytes, redact, remove_partial_writes, safe_child, write_bytes_atomic

__all__ = ["RESULTS_NAME", "RESULT_COLUMNS", "GenerateStage", "HypernetStage", "SetupError", "TooManyFailures",
           "apply_backbone_defaults", "check_artifacts", "failure_limit", "fetch_and_decode", "load_previous_results",
           "plan_job", "planned_blocks", "run_batch_job", "write_results", "write_videos"]

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.parquet"


# --- the driver ---

def made(rec: dict | None) -> bool:
    """A result record of a row made: ok, or skipped as done in an earlier run (it names its video)."""
    return bool(rec) and (rec.get("status") == "ok" or (rec.get("status") == "skipped" and bool(rec.get("output_uri"))))


def load_previous_results(output: str) -> dict[str, dict]:
    """Rows finished by earlier runs: the results table, read once, plus the per-row records written after it
    (a killed driver's). One listing of rows/; only records of rows the table does not have as `ok` are read,
    all at once (concurrent requests on S3): a resume costs requests per listing page, not per row."""
    from video2lora.storage import list_files, read_many

    done: dict[str, dict] = {}
    uri = join(output, RESULTS_NAME)
    if exists(uri):
        import io

        table = pd.read_parquet(io.BytesIO(read_bytes(uri)))
        done = {rec["sample_id"]: rec for rec in table.to_dict("records")}
    newer = [f for f in list_files(join(output, "rows"), suffix=".json")
             if not made(done.get(posixpath.basename(f)[: -len(".json")]))]
    for f, data in read_many(newer).items():
        try:
            if isinstance(data, Exception):
                raise data
            rec = json.loads(data)
            if not isinstance(rec, dict) or not isinstance(rec.get("sample_id"), str):
                raise ValueError("not a row record (no sample_id)")
        except (ValueError, OSError) as e:
            logger.warning("ignoring unreadable row record %s: %s", redact(f), e)
            continue
        if not made(done.get(rec["sample_id"])):
            done[rec["sample_id"]] = rec
    return done


def finished_videos(output: str) -> set[str]:
    """URIs of the videos under the output, from one listing (not one request per row)."""
    from video2lora.storage import list_files

    return set(list_files(join(output, "videos"), suffix=".mp4"))


def write_results(output: str, results: dict[str, dict]) -> str:
    import io

    df = pd.DataFrame(list(results.values()), columns=RESULT_COLUMNS)
    for c in ("reference_fit", "t_fetch_s", "t_hypernet_s", "t_refine_s", "t_generate_s", "t_write_s"):
        df[c] = df[c].astype("float64")
    df["lora_cache_hit"] = df["lora_cache_hit"].astype("boolean")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    uri = join(output, RESULTS_NAME)
    write_bytes_atomic(uri, buf.getvalue())
    return uri


def failure_limit(max_failures: float, total: int) -> int | None:
    if max_failures is None or max_failures < 0:
        return None
    if 0 < max_failures < 1:
        return int(max_failures * total)
    return int(max_failures)


class TooManyFailures(RuntimeError):
    pass


def check_artifacts(cfg: BatchJobConfig) -> str:
    """Load the checkpoint once on the driver (safetensors and config only: a pickle is refused, never unpickled)
    and check that the backbone is a pipeline directory, so a bad --checkpoint or --backbone fails at once with
    one clear message rather than in every actor. Returns the checkpoint's identity, from the bytes it read."""
    from pipelines.fingerprint import checkpoint_identity
    from video2lora.hypernet import Video2LoRAModel, read_checkpoint_files

    if not cfg.checkpoint:
        raise SetupError("no --checkpoint given")
    if not exists(join(cfg.backbone, "model_index.json")):
        raise SetupError(f"--backbone {redact(cfg.backbone)} is not a diffusers pipeline directory (no model_index.json)")
    try:
        files = read_checkpoint_files(cfg.checkpoint)
        Video2LoRAModel.from_bytes(*files, cfg.checkpoint)
    except Exception as e:  # noqa: BLE001 - whatever the reason, the job cannot start
        raise SetupError(f"--checkpoint {redact(cfg.checkpoint)} cannot be used: {error_text(e)}") from None
    return checkpoint_identity(cfg.checkpoint, files)


def _remove_partial_writes(output: str) -> None:
    """Temporary files of writes cut short by a killed worker or driver (local output); none is in flight now."""
    for d in (output, join(output, "videos"), join(output, "rows"), join(output, "loras")):
        for path in remove_partial_writes(d):
            logger.warning("removed %s, left by an interrupted write", redact(path))


def plan_job(manifest_uri: str, cfg: BatchJobConfig) -> tuple[Manifest, dict[str, dict]]:
    """(the checked manifest, rows done in earlier runs as `skipped` results). Everything the driver does before Ray
    starts; on a resume its requests grow with listing pages, not with rows, and it reads the manifest's
    sample_id column only."""
    from pipelines.manifest import open_manifest

    manifest = open_manifest(manifest_uri)
    previous = load_previous_results(cfg.output)
    videos = finished_videos(cfg.output) if previous else set()
    results: dict[str, dict] = {}
    for sid in manifest.ids:
        prev = previous.get(sid)
        if (made(prev) and prev.get("output_uri")
                and (prev["output_uri"] in videos or exists(prev["output_uri"]))):  # exists: an output spelt otherwise
            results[sid] = {**prev, "status": "skipped", "error": "done in an earlier run"}
    return manifest, results


class ChangedRows(SetupError):
    """Rows made earlier from other inputs or settings than the manifest and flags give now."""


def plan_row(row: dict, defaults: dict, job: dict, output: str, base: str = "") -> dict:
    """A manifest row checked on the driver (ValueError naming the field), as the stages take it: sources and
    typed settings (pipelines.manifest.SETTING_COLUMNS: no stage parses them again), and its fingerprint."""
    from pipelines.manifest import row_settings, row_sources

    sid = row["sample_id"]
    for name in (sid, f"{sid}.mp4", f"{sid}.json", f"{sid}.safetensors"):  # the id and every file it names
        safe_child(output, name)
    planned = {"sample_id": sid, **row_sources(row), "image_uri": row.get("image_uri") or "",
               **row_settings(row, defaults)}
    planned["row_fingerprint"] = row_fingerprint(planned, job, base)  # base: the manifest's folder
    return planned


def _forget(output: str, sid: str) -> None:
    """A row about to be made again (--redo-changed): its record goes, so that if the new attempt fails a later
    resume retries it rather than taking the old record's video as done. The old video stays until replaced."""
    from video2lora.storage import remove

    remove(safe_child(join(output, "rows"), f"{sid}.json"))


def planned_blocks(manifest: Manifest, results: dict[str, dict], cfg: BatchJobConfig, checkpoint_id: str | None = None):
    """The rows to run, with their typed settings, as DataFrames of one generation batch each, read from the
    manifest a batch of rows at a time (never all of it at once). Rows done earlier (in `results`) are left out,
    unless they were made from other inputs or settings than the manifest row's now: then the planning stops with
    ChangedRows naming them, or with cfg.redo_changed they are made again. A row the driver refuses is added to
    `results` as failed, with the reason. `checkpoint_id`: from check_artifacts, so the checkpoint is read once."""
    defaults = dataclasses.asdict(cfg.generation)
    job = job_signature(cfg, checkpoint_id)
    step = max(cfg.batch_size, 1)
    todo, changed, unchecked = [], [], 0
    for rows in manifest.batches():
        for row in rows:
            sid = row["sample_id"]
            done = results.get(sid)
            if done and done["status"] == "failed":
                continue  # refused in this run
            if done and not (isinstance(done.get("row_fingerprint"), str) and done["row_fingerprint"]):
                unchecked += 1  # made before rows had fingerprints: kept as it is
                continue
            try:
                planned = plan_row(row, defaults, job, cfg.output, manifest.base)
            except ValueError as e:
                if done:  # made earlier, now refused: its inputs changed
                    changed.append(sid)
                    if not cfg.redo_changed:
                        continue
                    _forget(cfg.output, sid)
                results[sid] = {c: None for c in RESULT_COLUMNS} | {"sample_id": sid, "status": "failed",
                                                                    "error": error_text(e)}
                continue
            if done and done["row_fingerprint"] == planned["row_fingerprint"]:
                continue  # made earlier from the same inputs and settings (a mix: refinement would not change it)
            if done:
                changed.append(sid)
                if not cfg.redo_changed:
                    continue
                del results[sid]
                _forget(cfg.output, sid)
            refusal = refine_refusal(planned) if cfg.generation.refine_steps else None
            if refusal is not None:  # refused before any work, like a row plan_row refuses
                results[sid] = {c: None for c in RESULT_COLUMNS} | {"sample_id": sid, "status": "failed",
                                                                    "error": error_text(refusal)}
                continue
            todo.append(planned)
        whole = len(todo) - len(todo) % step
        if whole:  # one DataFrame per manifest batch, cut in slices: a DataFrame per 4 rows costs 25x more
            df = pd.DataFrame(todo[:whole])
            yield from (df.iloc[i: i + step] for i in range(0, whole, step))
            todo = todo[whole:]
    if todo:
        yield pd.DataFrame(todo)
    if unchecked:
        logger.warning("%d row(s) made before rows had fingerprints were kept without a check", unchecked)
    if changed:
        logger.warning("%d row(s) made earlier from other inputs or settings%s, e.g. %s", len(changed),
                       ": made again (--redo-changed)" if cfg.redo_changed else "", ", ".join(changed[:5]))
        if not cfg.redo_changed:
            raise ChangedRows(
                f"{len(changed)} row(s) in {redact(cfg.output)} were made from another prompt, reference, setting, "
                f"checkpoint, backbone or step cache than the manifest and flags give now (e.g. "
                f"{', '.join(repr(s) for s in changed[:5])}); nothing was run. Pass --redo-changed to make them "
                f"again, or give the job another --output")


def run_batch_job(manifest_uri: str, cfg: BatchJobConfig, progress: bool = True) -> dict:
    """Run (or resume) the batch job. Returns a summary; raises TooManyFailures past --max-failures,
    after writing the results of every finished row."""
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    start = time.perf_counter()
    manifest, results = plan_job(manifest_uri, cfg)
    ids = manifest.ids
    limit = failure_limit(cfg.max_failures, len(ids))
    to_run = len(ids) - len(results)
    logger.info("%d rows: %d to do, %d done earlier", len(ids), to_run, len(results))
    # always: its identity goes into every row's fingerprint, and a checkpoint that cannot be read fails here
    checkpoint_id = check_artifacts(cfg)
    _remove_partial_writes(cfg.output)

    init_ray()  # actors' warnings and errors reach the driver's log (`ray job logs`); their INFO stays in their files
    cfg = with_placement(cfg, ray.cluster_resources().get("GPU", 0))  # counts the user left unset
    logger.info("%d generation actor(s) x %g GPU, %d hypernetwork actor(s) x %g GPU", cfg.num_gen_actors,
                cfg.gen_num_gpus, cfg.num_hyper_actors, cfg.hyper_num_gpus)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job's own bar counts rows; Ray Data's notice that its bars are off is
    from ray.util.debug import log_once  # not for our users: mark it as already said

    log_once("ray_data_progress_manager_disabled")
    if progress:  # Ray Data's INFO lines (plan, where its logs are) would break up the bar; they stay in its log files
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.execution_options.preserve_order = False

    last_flush = time.perf_counter()
    stopped = None
    # blocks of one generation batch each, cut here on the driver as the manifest is read and put in the object
    # store one by one (the driver never holds all rows): a repartition would run as tasks of 1 CPU, which never
    # get scheduled once the actors hold more than all CPUs but one (e.g. 2 generation actors + the hypernetwork
    # actor at 0.5 CPU each on 2 CPUs), and the job would hang
    blocks = [ray.put(block) for block in planned_blocks(manifest, results, cfg, checkpoint_id)]  # ChangedRows: nothing written
    # which manifest made this output: the gallery page reads its prompts and references
    manifest_abs = manifest_uri if "://" in manifest_uri else os.path.abspath(manifest_uri)
    write_bytes_atomic(join(cfg.output, JOB_NAME), json.dumps({"manifest": manifest_abs}).encode())
    failed = sum(r["status"] == "failed" for r in results.values())
    to_run = len(ids) - sum(r["status"] == "skipped" for r in results.values())  # --redo-changed adds rows
    todo_rows = to_run - failed
    metrics = JobMetrics(redact(cfg.output))
    metrics.count("skipped", len(ids) - to_run)  # done in earlier runs
    if cfg.generation.measures_fit and len(ids) > to_run:  # the fit changes no video: those rows are not redone
        logger.warning("%d row(s) made in an earlier run are skipped and get no reference_fit; give a new --output "
                       "to measure every row", len(ids) - to_run)
    metrics.count("failed", failed)  # refused on the driver
    metrics.set_in_flight(todo_rows)
    in_flight = todo_rows
    if blocks:
        ds = ray.data.from_pandas_refs(blocks)
        ds = ds.map_batches(fetch_and_decode, batch_format="pandas", batch_size=cfg.batch_size,
                            num_cpus=cfg.decode_num_cpus, fn_kwargs={"cfg": cfg})
        # A dead actor (killed, node lost) is restarted and the batches it held are run again (Ray Data's actor
        # pools default to max_restarts=-1, max_task_retries=-1; tests/faults checks it): stages are pure and every
        # write is atomic, so a row is never half-written nor reported twice.
        # the hypernetwork's output blocks are what the generation actors are handed, whole: blocks of more than
        # one generation batch would leave actors idle (3 blocks of 8 rows over 2 actors: one does 16 rows, the
        # other 8) and hold each row back until its whole block is generated
        ds = ds.map_batches(HypernetStage, batch_format="pandas", batch_size=min(cfg.hyper_batch_size, cfg.batch_size),
                            compute=ActorPoolStrategy(size=cfg.num_hyper_actors),
                            num_gpus=cfg.hyper_num_gpus, num_cpus=cfg.actor_num_cpus,
                            fn_constructor_kwargs={"backbone_uri": cfg.backbone, "checkpoint_uri": cfg.checkpoint,
                                                   "cfg": cfg})
        ds = ds.map_batches(GenerateStage, batch_format="pandas", batch_size=cfg.batch_size,
                            compute=ActorPoolStrategy(size=cfg.num_gen_actors),
                            num_gpus=cfg.gen_num_gpus, num_cpus=cfg.actor_num_cpus,
                            fn_constructor_kwargs={"backbone_uri": cfg.backbone, "checkpoint_uri": cfg.checkpoint, "cfg": cfg})
        ds = ds.map_batches(write_videos, batch_format="pandas", batch_size=cfg.batch_size,
                            num_cpus=cfg.decode_num_cpus, fn_kwargs={"cfg": cfg})
        bar = tqdm(total=todo_rows, desc="videos", unit="row", disable=not progress, dynamic_ncols=True)
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for rec in batch.to_dict("records"):
                results[rec["sample_id"]] = rec
                metrics.finished(rec)
                in_flight -= 1
                failed += rec["status"] == "failed"
                if rec["status"] == "failed":
                    logger.warning("row %s failed: %s", rec["sample_id"], rec["error"])
            metrics.set_in_flight(in_flight)
            bar.update(len(batch))
            bar.set_postfix(failed=failed)
            if time.perf_counter() - last_flush > cfg.results_flush_seconds:
                write_results(cfg.output, results)
                last_flush = time.perf_counter()
            if limit is not None and failed > limit:
                stopped = f"stopped: {failed} failed rows exceed --max-failures {cfg.max_failures}"
                break
        bar.close()
        if not stopped:  # every write has ended: clear what a killed actor left, e.g. a LoRA file cut short
            _remove_partial_writes(cfg.output)
    not_run = [sid for sid in ids if sid not in results]
    for sid in not_run:
        results[sid] = {c: None for c in RESULT_COLUMNS} | {"sample_id": sid, "status": "skipped",
                                                              "error": stopped or "not run"}
    metrics.count("skipped", len(not_run))
    metrics.set_in_flight(0)
    uri = write_results(cfg.output, results)
    wall = time.perf_counter() - start
    counts = pd.Series([r["status"] for r in results.values()]).value_counts().to_dict()
    made = counts.get("ok", 0)
    gen_busy = sum(float(r.get("t_generate_s") or 0) + float(r.get("t_refine_s") or 0)
                   for r in results.values() if r["status"] == "ok")
    summary = {
        "rows": len(ids), "ok": made, "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
        "wall_s": wall, "rows_per_s": made / wall if wall else 0.0,
        "generation_busy_fraction": gen_busy / (wall * max(cfg.num_gen_actors, 1)),
        "results_uri": uri, "videos_uri": join(cfg.output, "videos"),
    }
    if stopped:
        raise TooManyFailures(f"{stopped}; results of finished rows are in {redact(uri)}")
    return summary


def apply_backbone_defaults(cfg: BatchJobConfig, explicit: set[str] = frozenset()) -> BatchJobConfig:
    """Take the generation settings a backbone dir carries (generation_defaults.json, e.g. the tiny models'
    size) for every field the user did not set explicitly."""
    from video2lora.presets import DEFAULTS_NAME

    uri = join(cfg.backbone, DEFAULTS_NAME)
    values = json.loads(read_bytes(uri)) if exists(uri) else {}
    for k, v in values.items():
        if k not in explicit and hasattr(cfg.generation, k):
            setattr(cfg.generation, k, v)
    return cfg
