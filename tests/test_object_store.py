"""An object-store run directory (s3:// on a local S3 server): publishing, pulling, resuming, never half-done."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradfilter_ray.config import ConfigError, load
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.storage import ObjectStore, StorageError, check_uri, is_remote, local_path


def _stage_with(rundir: RunDir, stage: str, files: dict[str, bytes], key: str = "k1") -> dict:
    """Run a fake stage the way pipeline.run_stage does: write into staging, commit, finish."""
    with rundir.staging(stage) as staged:
        for rel, data in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(data)
        outputs = sorted({rel.split("/")[0] for rel in files})
        rundir.commit(staged, outputs)
    record = {"status": "done", "key": key, "finished": f"t-{key}", "outputs": outputs}
    rundir.finish_stage(stage, outputs, record)
    return record


def test_uris_with_credentials_are_refused_and_local_forms_stay_local():
    with pytest.raises(StorageError, match="credentials"):
        check_uri("s3://AKIAEXAMPLE:secret@bucket/run")
    with pytest.raises(StorageError, match="secret_key"):
        check_uri("s3://bucket/run?access_key=a&secret_key=b")
    with pytest.raises(ConfigError, match="credentials"):
        load(None, ["output_dir=s3://key:secret@bucket/run"])
    assert load(None, ["output_dir=s3://bucket/run?region=eu-west-1"]).output_dir.startswith("s3://")
    assert not is_remote("runs/demo") and not is_remote("file:///tmp/x") and is_remote("gs://b/p")
    assert str(local_path("file:///tmp/x")) == "/tmp/x" and str(local_path("file:///tmp/a%20b")) == "/tmp/a b"
    for typo in ("s3:/bucket/run", "gs:bucket/run"):
        with pytest.raises(StorageError, match="mistyped"):
            check_uri(typo)
    assert (
        RunDir("file:///tmp/gfr-local").store is None and str(RunDir("file:///tmp/gfr-local").root) == "/tmp/gfr-local"
    )


def test_a_published_stage_is_seen_by_a_fresh_driver_and_downloaded_only_when_stale(s3_server, tmp_path):
    uri = s3_server.uri()
    first = RunDir(uri, tmp_path / "driver1")
    first.pull()
    record = _stage_with(first, "finetune", {"finetune/a/model/w.bin": b"weights", "finetune/a/loss.csv": b"1,2\n"})
    store = ObjectStore(uri)
    assert store.files("finetune") == ["a/loss.csv", "a/model/w.bin"]
    assert json.loads(store.read_text("manifest.json"))["stages"]["finetune"]["status"] == "done"

    second = RunDir(uri, tmp_path / "driver2")  # a new pod: nothing local
    second.pull()
    assert second.stage_done("finetune", "k1")
    second.ensure_local("finetune", skip_dirs=("model",))
    assert (second.root / "finetune/a/loss.csv").read_bytes() == b"1,2\n"
    assert not (second.root / "finetune/a/model").exists()  # weights stay in the store
    second.ensure_local("finetune")  # a reader that needs the weights gets them
    assert (second.root / "finetune/a/model/w.bin").read_bytes() == b"weights"

    # A copy that lost a file since it was fetched (a temp cleaner, a hand edit) is fetched again.
    (second.root / "finetune/a/loss.csv").unlink()
    second.ensure_local("finetune")
    assert (second.root / "finetune/a/loss.csv").read_bytes() == b"1,2\n"

    # Current copies are not fetched again: removing the remote object does not break a second call.
    store.delete("finetune/a/loss.csv")
    second.ensure_local("finetune")
    assert (second.root / "finetune/a/loss.csv").exists()
    assert record["key"] == second.stage_record("finetune")["key"]


def test_republishing_replaces_every_object_and_a_local_copy_left_behind_is_refreshed(s3_server, tmp_path):
    uri = s3_server.uri()
    driver = RunDir(uri, tmp_path / "d1")
    driver.pull()
    _stage_with(driver, "select", {"selected/a.parquet": b"old-a", "selected/b.parquet": b"old-b"}, key="k1")
    reader = RunDir(uri, tmp_path / "d2")
    reader.pull()
    reader.ensure_local("select")
    _stage_with(driver, "select", {"selected/a.parquet": b"new-a"}, key="k2")
    assert ObjectStore(uri).files("selected") == ["a.parquet"]  # b is gone, not left stale

    reader.pull()
    reader.ensure_local("select")
    assert (reader.root / "selected/a.parquet").read_bytes() == b"new-a"
    assert not (reader.root / "selected/b.parquet").exists()


def test_a_crash_while_publishing_leaves_the_stage_not_done(s3_server, tmp_path, monkeypatch):
    uri = s3_server.uri()
    driver = RunDir(uri, tmp_path / "d1")
    driver.pull()
    _stage_with(driver, "score", {"scores.parquet": b"v1"}, key="k1")

    uploads = []

    def fail_on_second(local, rel):
        uploads.append(rel)
        if len(uploads) == 2:
            raise OSError("connection reset (simulated)")
        return original(local, rel)

    original = driver.store.upload
    monkeypatch.setattr(driver.store, "upload", fail_on_second)
    with pytest.raises(OSError, match="simulated"):
        _stage_with(driver, "score", {"scores.parquet": b"v2", "zz_extra.bin": b"x"}, key="k2")

    fresh = RunDir(uri, tmp_path / "d2")
    fresh.pull()
    assert not fresh.stage_done("score", "k1") and not fresh.stage_done("score", "k2")
    assert fresh.stage_record("score")["status"] == "publishing"

    monkeypatch.setattr(driver.store, "upload", original)
    _stage_with(driver, "score", {"scores.parquet": b"v2", "zz_extra.bin": b"x"}, key="k2")
    fresh.pull()
    fresh.ensure_local("score")
    assert fresh.stage_done("score", "k2") and (fresh.root / "scores.parquet").read_bytes() == b"v2"


def test_worker_output_goes_through_the_store_and_stale_scratch_is_cleaned(s3_server, tmp_path):
    uri = s3_server.uri()
    driver = RunDir(uri, tmp_path / "d1")
    driver.pull()
    with driver.staging("extract") as staged:
        with driver.worker_output(staged, "gradients") as target:
            assert target.filesystem is not None and target.path.startswith(driver.store.base + "/.staging-")
            target.filesystem.create_dir(target.path)
            pq.write_table(pa.table({"id": ["a", "b"]}), f"{target.path}/part-0.parquet", filesystem=target.filesystem)
        assert pq.read_table(staged / "gradients")["id"].to_pylist() == ["a", "b"]
        with driver.worker_output(staged, "empty"):
            pass
        assert (staged / "empty").is_dir()
    assert not [n for n in driver.store.top_level() if n.startswith(".staging-")]

    driver.store.write_text(".staging-extract-dead/gradients/part-0.parquet", "left by a killed run")
    assert driver.clean_stale_staging() == 1
    assert not [n for n in driver.store.top_level() if n.startswith(".staging-")]


def test_a_missing_bucket_is_a_clear_error_before_any_work(s3_server, tmp_path):
    uri = s3_server.uri().replace("&allow_bucket_creation=true", "")
    driver = RunDir(uri, tmp_path / "d")
    with pytest.raises(StorageError, match="cannot create or reach it"):
        driver.pull()


def test_a_finished_fine_tuning_subset_survives_a_new_driver_and_goes_once_published(s3_server, tmp_path):
    from gradfilter_ray.target.stage import HELD_MARKER, SUMMARY, fetch_held, hold

    uri = s3_server.uri()
    first = RunDir(uri, tmp_path / "d1")
    first.pull()
    done_dir = first.finetune_done / "key1" / "gsnr_0.1"
    (done_dir / "model").mkdir(parents=True)
    (done_dir / "model" / "model.safetensors").write_bytes(b"weights")
    (done_dir / SUMMARY).write_text('{"total_steps": 3}')
    hold(first, done_dir)

    second = RunDir(uri, tmp_path / "d2")  # the first driver died before the stage was published
    second.pull()
    again = second.finetune_done / "key1" / "gsnr_0.1"
    assert fetch_held(second, again)
    assert (again / "model" / "model.safetensors").read_bytes() == b"weights"
    assert (again / SUMMARY).exists() and not (again / HELD_MARKER).exists()

    # An upload cut short (no marker) is not taken for a finished subset.
    second.store.delete(f".finetune_done/key1/gsnr_0.1/{HELD_MARKER}")
    assert not fetch_held(
        RunDir(uri, tmp_path / "d3"), RunDir(uri, tmp_path / "d3").finetune_done / "key1" / "gsnr_0.1"
    )

    # The holding area goes only after the stage's record is written.
    second.on_finish(lambda: second.remove_shared(".finetune_done"))
    assert second.store.exists(".finetune_done")
    _stage_with(second, "finetune", {"finetune/summary.json": b"{}"})
    assert not second.store.exists(".finetune_done") and second.stage_done("finetune", "k1")


def test_the_judge_cache_of_two_drivers_is_merged_not_overwritten(s3_server, tmp_path):
    uri = s3_server.uri()
    first = RunDir(uri, tmp_path / "d1")
    first.pull()
    (first.root / ".judge_cache.jsonl").write_text('{"k": "a"}\n{"k": "b"}\n')
    _stage_with(first, "evaluate", {"eval/runs.json": b"{}"})
    second = RunDir(uri, tmp_path / "d2")
    (second.root).mkdir(parents=True)
    (second.root / ".judge_cache.jsonl").write_text('{"k": "b"}\n{"k": "c"}\n')  # an older, different copy
    second.pull()
    assert (second.root / ".judge_cache.jsonl").read_text().splitlines() == ['{"k": "a"}', '{"k": "b"}', '{"k": "c"}']
    _stage_with(second, "evaluate", {"eval/runs.json": b"{}"}, key="k2")
    assert ObjectStore(uri).read_text(".judge_cache.jsonl").count("\n") == 3


def test_a_stage_refuses_to_read_a_stage_that_is_not_done_for_this_config(tmp_path, s3_server):
    from gradfilter_ray import pipeline

    cfg = load(None, [f"output_dir={tmp_path / 'run'}"])
    rundir = RunDir(cfg.output_dir)
    rundir.record_stage("score", {"status": "done", "key": pipeline.stage_key("score", cfg)})
    # select reads ingest's rows itself (not only score's): an ingest left half-published must stop it.
    rundir.record_stage("ingest", {"status": "publishing", "key": pipeline.stage_key("ingest", cfg)})
    with pytest.raises(pipeline.StageOrderError, match="'ingest'"):
        pipeline.run_stage("select", cfg, rundir, log=lambda _: None)
    with pytest.raises(RuntimeError, match="not done"):
        RunDir(s3_server.uri(), tmp_path / "d").ensure_local("ingest")
