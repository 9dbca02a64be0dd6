"""`gradfilter-ray gc`: what it keeps and removes on a synthetic run directory holding the unit outputs of two configs
A and B (they differ in one selection ratio), with the real stage keys; exact byte counts; the manifest's references
after a removal; the CLI verb's output and exit codes; the run summary's line on unreferenced data."""

import argparse
import subprocess
import sys
from pathlib import Path

from gradfilter_ray import cli, gc
from gradfilter_ray.config import load
from gradfilter_ray.driver_claim import DriverClaim
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.units import unit_name

REPO = Path(__file__).resolve().parents[1]
STALE = "0123456789abcdef"  # a stage key neither config has: an older config's


def key16(n: int) -> str:
    return f"{n:016x}"


def write_configs(tmp_path: Path, output_dir: str) -> tuple[Path, Path]:
    paths = []
    for name, ratios in (("a", "[0.1]"), ("b", "[0.1, 0.2]")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"output_dir: '{output_dir}'\nselection:\n  ratios: {ratios}\n")
        paths.append(path)
    return paths[0], paths[1]


def put(run: RunDir, rel: str, *sizes: int) -> int:
    """A file at `rel` (one size) or a folder of files (several); the bytes written."""
    if len(sizes) == 1 and "." in rel.rsplit("/", 1)[-1]:
        run.at(rel).write_bytes(b"x" * sizes[0])
    else:
        for i, size in enumerate(sizes):
            (run.at(rel) / f"part-{i}.bin").write_bytes(b"y" * size)
    return sum(sizes)


def synthetic_run(output_dir: str, a, b) -> dict:
    """A run directory as the stages leave it after running A, then B, with an older config's units beside them.
    Returns the paths by who references them and every path's bytes."""
    run = RunDir(output_dir)
    run.ensure_exists()
    ka, kb = gc.stage_keys(a), gc.stage_keys(b)
    assert ka[""]["ensemble"] == kb[""]["ensemble"] and ka[""]["finetune"] != kb[""]["finetune"]
    assert ka["audit"] == kb["audit"]  # the audit's inner stages do not read the selection
    member = f"ensemble/{unit_name('member_seed42', key16(1))}"
    shared_subset = f"finetune/{unit_name('gsnr_0.1', key16(2))}"
    both = [member, f".ray_train/ensemble-{ka['']['ensemble']}", shared_subset]
    a_only = [f".ray_train_finetune/finetune-{ka['']['finetune']}-gsnr_0.1", f"evaluation/runs/gsnr_0.1-{key16(3)}"]
    b_only = [
        f"finetune/{unit_name('gsnr_0.2', key16(4))}",
        f".ray_train_finetune/finetune-{kb['']['finetune']}-gsnr_0.2",
        f"evaluation/runs/gsnr_0.2-{key16(5)}",
        f"evaluation/judge/gsnr_0.2-vs-full-{key16(6)}.jsonl",
    ]
    old_subset = f"finetune/{unit_name('gsnr_0.3', key16(7))}"
    neither = [old_subset, f"audit/ensemble/{unit_name('member_seed9', key16(8))}"]
    sizes = {}
    for i, rel in enumerate([*both, *a_only, *b_only, *neither]):
        sizes[rel] = put(run, rel, 333) if rel.endswith(".jsonl") else put(run, rel, 100 + i, 7 * i + 1)
    audit_member = f"ensemble/{unit_name('member_seed42', key16(9))}"
    sizes[f"audit/{audit_member}"] = put(run, f"audit/{audit_member}", 55)
    put(run, "finetune/my_notes.txt", 12)  # a user's own file: no record names it

    for cfg_keys, refs in ((ka, a_only), (kb, b_only)):
        run.add_references("ensemble", cfg_keys[""]["ensemble"], both[:2])
        finetune = [p for p in [shared_subset, *refs] if "finetune" in p]
        run.add_references("finetune", cfg_keys[""]["finetune"], finetune)
        run.add_references("evaluation", cfg_keys[""]["evaluation"], [p for p in refs if p.startswith("evaluation")])
        run.record_stage("finetune", {"status": "done", "key": cfg_keys[""]["finetune"], "units": {}})
    # An older config's: its own subset (and, nested, its model), a path never written, and paths nested with kept
    # ones (a parent of kept runs, a folder inside a kept member): those nested ones stay.
    stale = [old_subset, f"{old_subset}/model", "finetune/gsnr_0.5-never-written", "evaluation/runs", f"{member}/x"]
    run.add_references("finetune", STALE, stale)
    inner = run.subdir("audit")
    inner.add_references("ensemble", ka["audit"]["ensemble"], [audit_member])
    inner.add_references("ensemble", STALE, [neither[1].removeprefix("audit/")])
    return {
        "both": both,
        "a_only": a_only,
        "b_only": b_only,
        "neither": neither,
        "audit_member": audit_member,
        "sizes": sizes,
    }


def test_gc_keeps_what_the_kept_configs_reference_and_removes_the_rest_with_exact_sizes(tmp_path):
    output_dir = str(tmp_path / "run")
    a, b = (load(path) for path in write_configs(tmp_path, output_dir))
    made = synthetic_run(output_dir, a, b)
    run, sizes = RunDir(output_dir), made["sizes"]

    keep_both = gc.plan(run, [a, b], measure_held=True)
    assert keep_both.remove == {p: sizes[p] for p in made["neither"]}
    assert keep_both.held == sum(sizes.values())  # every recorded path, each byte once (nested records included)

    dry = gc.plan(run, [a], measure_held=True)
    expected = {p: sizes[p] for p in made["b_only"] + made["neither"]}
    assert dry.remove == expected and dry.freed == sum(expected.values())
    assert all(run.at(p).exists() for p in expected)  # planning removes nothing

    gc.collect(run, dry)
    assert not any(run.at(p).exists() for p in expected)
    for rel in [*made["both"], *made["a_only"], "audit/" + made["audit_member"]]:
        assert run.at(rel).exists(), rel
    assert run.at("finetune/my_notes.txt").read_bytes() == b"x" * 12  # never recorded: never touched

    stored = RunDir(output_dir)  # read back from the store, not the driver's copy
    # Every recorded path that no longer exists (removed, or never written) is gone from the references; the older
    # config's record of `evaluation/runs`, which holds kept runs, stays.
    assert stored.references() == {*made["both"], *made["a_only"], "evaluation/runs"}
    assert stored.references("finetune", STALE) == {"evaluation/runs"}
    # B's evaluation key has no path left: the key goes too.
    assert list(stored.read_manifest()["references"]["evaluation"]) == [gc.stage_keys(a)[""]["evaluation"]]
    assert stored.subdir("audit").references() == {made["audit_member"]}
    assert gc.plan(stored, [a]).remove == {}


def test_gc_marks_the_stage_records_over_units_it_removed_not_done_and_keeps_the_kept_configs_done(tmp_path):
    output_dir = str(tmp_path / "run")
    a, b = (load(path) for path in write_configs(tmp_path, output_dir))
    made = synthetic_run(output_dir, a, b)  # B ran last: the finetune record is B's
    run = RunDir(output_dir)
    ka, kb = gc.stage_keys(a), gc.stage_keys(b)
    run.record_stage("evaluation", {"status": "done", "key": kb[""]["evaluation"], "outputs": ["evaluation"]})
    run.record_stage("ensemble", {"status": "done", "key": ka[""]["ensemble"], "outputs": ["ensemble"]})  # A's and B's
    gradients_a = f"gradients/{ka['']['gradients']}"
    put(run, f"{gradients_a}/part-0.parquet", 9)
    run.add_references("gradients", ka[""]["gradients"], [gradients_a])
    run.record_stage("gradients", {"status": "done", "key": ka[""]["gradients"], "outputs": ["gradients"]})
    inner = run.subdir("audit")
    inner.record_stage("ensemble", {"status": "done", "key": ka["audit"]["ensemble"], "outputs": ["ensemble"]})
    inner.record_stage("gradients", {"status": "done", "key": STALE, "outputs": ["gradients"]})  # an older config's
    inner.add_references("gradients", STALE, ["gradients/" + STALE])
    put(inner, f"gradients/{STALE}/part-0.parquet", 4)
    before = run.read_manifest()["stages"]

    gc.collect(run, gc.plan(run, [a]))
    stored = RunDir(output_dir)
    for stage in ("finetune", "evaluation"):
        record = stored.stage_record(stage)
        assert not stored.stage_done(stage, kb[""][stage]), stage  # B's next run redoes the stage (its missing units)
        assert record["status"] == "collected" and "gc removed unit outputs" in record["reason"]
        assert {**record, "status": "done", "reason": None} == {**before[stage], "reason": None}  # the rest as it was
    assert any(p in stored.stage_record("finetune")["reason"] for p in made["b_only"])
    assert stored.stage_done("ensemble", ka[""]["ensemble"]) and stored.stage_done("gradients", ka[""]["gradients"])
    audit = stored.subdir("audit")
    assert audit.stage_done("ensemble", ka["audit"]["ensemble"])  # A's audit member is kept
    assert audit.stage_record("gradients")["status"] == "collected"  # the older config's folder went
    assert audit.stage_record("gradients")["outputs"] == ["gradients"]
    assert gc.collected_records(stored.read_manifest(), made["b_only"]) == {}  # collected records stay as they are


def test_gc_on_an_object_store(s3_server):
    run = RunDir(s3_server.uri())
    run.ensure_exists()
    cfg = load(None)
    keep, old = "finetune/gsnr_0.1-0000000000000001", "finetune/gsnr_0.1-0000000000000002"
    for rel, size in ((keep, 10), (old, 21)):
        run.at(f"{rel}/model/w.bin").write_bytes(b"w" * size)
        run.at(f"{rel}/loss.csv").write_bytes(b"l" * 5)
    run.at("finetune/notes.txt").write_bytes(b"mine")
    run.add_references("finetune", gc.stage_keys(cfg)[""]["finetune"], [keep])
    run.add_references("finetune", STALE, [old])
    planned = gc.plan(run, [cfg], measure_held=True)
    assert (planned.remove, planned.held) == ({old: 26}, 41)
    gc.collect(run, planned)
    assert run.at("finetune").children() == ["gsnr_0.1-0000000000000001", "notes.txt"]
    assert RunDir(run.location).references() == {keep}


def test_removable_handles_nesting():
    kept = {"ensemble/m-1", "evaluation/runs/r-1"}
    nested = {"ensemble/m-1/epoch_1", "evaluation/runs", "evaluation/runs/r-2", "finetune/s-3", "finetune/s-3/x"}
    recorded = kept | nested
    assert gc.removable(recorded, kept) == ["evaluation/runs/r-2", "finetune/s-3"]
    assert gc.removable(recorded, set()) == ["ensemble/m-1", "evaluation/runs", "finetune/s-3"]


def test_a_recorded_path_outside_the_run_directory_is_never_a_candidate(tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me")
    run = RunDir(tmp_path / "run")
    run.add_references("finetune", STALE, ["../elsewhere.txt", "", "."])
    assert gc.plan(run, [load(None)]).remove == {}
    assert outside.read_text() == "keep me"


def test_human_sizes():
    assert [gc.human(n) for n in (0, 1023, 1024, 1288490188)] == ["0 B", "1023 B", "1.0 KiB", "1.2 GiB"]


def gc_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradfilter_ray", "gc", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_gc_verb_lists_removes_and_exits_as_the_other_verbs(tmp_path, capsys):
    output_dir = str(tmp_path / "run")
    path_a, path_b = write_configs(tmp_path, output_dir)
    made = synthetic_run(output_dir, load(path_a), load(path_b))
    sizes, gone = made["sizes"], made["b_only"] + made["neither"]
    total = sum(sizes.values())

    dry = gc_cli("--config", str(path_a), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    width = max(len(gc.human(sizes[p])) for p in gone)
    assert lines[:-1] == [f"{gc.human(sizes[p]):>{width}}  {p}" for p in sorted(gone)]
    freed = sum(sizes[p] for p in gone)
    assert lines[-1].startswith(f"would free {gc.human(freed)} of {gc.human(total)}")
    assert f"({freed} of {total} bytes, {len(gone)} paths)" in lines[-1]
    assert all(RunDir(output_dir).at(p).exists() for p in gone)

    with DriverClaim(RunDir(output_dir).root, settle_s=0):  # another driver holds the run directory
        assert cli.main(["gc", "--config", str(path_a)]) == cli.EXIT_IN_USE
    assert "in use by another driver" in capsys.readouterr().err
    assert all(RunDir(output_dir).at(p).exists() for p in gone)

    assert cli.main(["gc", "-c", str(path_a), "-c", str(path_b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out[:-1]] == sorted(made["neither"])
    assert out[-1].startswith("freed ")
    assert cli.main(["gc", "--config", str(path_a)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out[:-1]] == sorted(made["b_only"])
    assert not any(RunDir(output_dir).at(p).exists() for p in gone)
    assert cli.main(["gc", "--config", str(path_a)]) == 0
    assert capsys.readouterr().out.startswith("nothing to remove:")

    assert cli.main(["gc", "--config", str(path_a), "--set", "selection.ratioz=[0.1]"]) == cli.EXIT_CONFIG
    assert "selection.ratioz" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(f"output_dir: '{tmp_path / 'another'}'\n")
    assert cli.main(["gc", "-c", str(path_a), "-c", str(other)]) == cli.EXIT_CONFIG
    assert "different output_dirs" in capsys.readouterr().err
    assert cli.main(["gc", "-c", str(other)]) == cli.EXIT_CONFIG  # it does not exist: nothing made there either
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "another").exists()


def test_the_run_summary_says_how_much_other_configs_leave_and_how_to_list_it(tmp_path, capsys):
    output_dir = str(tmp_path / "run")
    path_a, path_b = write_configs(tmp_path, output_dir)
    a = load(path_a, ["ensemble.epochs=2"])
    made = synthetic_run(output_dir, a, load(path_b, ["ensemble.epochs=2"]))
    args = argparse.Namespace(config=str(path_a), given_overrides=["ensemble.epochs=2"])
    cli._print_unreferenced(a, RunDir(output_dir), args)
    gone = made["b_only"] + made["neither"]
    freed = sum(made["sizes"][p] for p in gone)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"unreferenced: {gc.human(freed)} ({freed} bytes) in {len(gone)} unit outputs")
    assert f"`gradfilter-ray gc --config {path_a} --set ensemble.epochs=2 --dry-run`" in line

    gc.collect(RunDir(output_dir), gc.plan(RunDir(output_dir), [a]))
    cli._print_unreferenced(a, RunDir(output_dir), args)
    assert capsys.readouterr().out == ""  # nothing unreferenced: no line
