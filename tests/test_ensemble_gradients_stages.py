"""Tokens, ensemble and extraction stages on the session's local Ray with a tiny GPT-2, on the config of the suite's
reference CLI run (tests/cli_runs.py): outputs, resume (a preempted attempt is not done, and its re-run starts its
unfinished members anew from their checkpoint, ending where the uninterrupted reference run's members did), members
as units (a member more trains that member alone, fewer members or a shifted seed reuse finished ones),
exactly-once, tokens/ equal to tokenising in-process, equality with a bare in-process computation and with the
batch-size-1 reference, determinism."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runs import ROWS, tiny_cfg

from gradfilter_ray import pipeline
from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.ensemble.batching import epoch_batches, padding_stats
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.units import ensemble_members

pytestmark = [pytest.mark.ray, pytest.mark.slow]
QUIET = {"log": lambda _: None}
OTHER_TRAINER = "ensemble-0123abcd0123abcd"
OTHER_MEMBER = "member_seed7-0123456789abcdef"


@pytest.fixture(scope="module")
def finished_run(ray_cluster, reference_run, tmp_path_factory):
    """ingest -> tokens -> ensemble (interrupted after epoch 1, then resumed) -> extract, once for the module, on the
    reference run's config (so the whole module runs in the session's CLI-run group, see conftest)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = tiny_cfg(out)
    rundir = RunDir(str(out))
    pipeline.run_stage("data", cfg, rundir, **QUIET)
    pipeline.run_stage("tokens", cfg, rundir, **QUIET)
    # A preempted first attempt: the trainer stops after epoch 1, leaving its checkpoint and (written in place)
    # epoch 1 of each member in its folder, but no `_done` marker and no record: the stage is not done.
    key = pipeline.stage_key("ensemble", cfg)
    members = ensemble_members(cfg, rundir.stage_record("tokens")["key"])
    rundir.begin_stage("ensemble", key, pipeline.STAGES["ensemble"].writes, keep_outputs=True)
    partial = ensemble_stage.build_trainer(
        cfg, rundir, members, ensemble_stage.token_dataset(rundir), stop_after_epoch=1
    ).fit()
    assert partial.error is None and partial.metrics["epoch"] == 1
    with partial.checkpoint.as_directory() as saved:
        early_before = (Path(saved) / members[1].folder / "epoch_1" / "adapter_model.safetensors").read_bytes()
        assert not (Path(saved) / members[1].folder / "epoch_2").exists()
    member_1 = rundir.ensemble / members[1].folder
    assert (member_1 / "epoch_1" / "adapter_model.safetensors").read_bytes() == early_before
    assert not (member_1 / "epoch_2").exists() and not (member_1 / ensemble_stage.MEMBER_DONE).exists()
    assert not rundir.stage_done("ensemble", key)
    # A file the preempted attempt left in an unfinished member's folder: the re-run starts that folder anew (from
    # the checkpoint), so it must be gone afterwards.
    (rundir.ensemble / members[0].folder / "stale-from-the-preempted-attempt.txt").write_text("stale")
    # Another config's trainer folder and finished member: the stage leaves both as they are (`gc` removes them).
    (rundir.ensemble_train_state / OTHER_TRAINER / "checkpoint_x" / "state").write_bytes(b"x")
    (rundir.ensemble / OTHER_MEMBER / ensemble_stage.MEMBER_DONE).write_text("{}")
    record = pipeline.run_stage("ensemble", cfg, rundir, **QUIET)
    extract = pipeline.run_stage("gradients", cfg, rundir, **QUIET)
    return cfg, rundir, record, extract, early_before


def test_tokens_stage_equals_tokenizing_in_process_token_by_token(finished_run):
    from gradfilter_ray.data.tokenized import TOKEN_SCHEMA, tokenize_table
    from gradfilter_ray.models import load_tokenizer

    cfg, rundir, record, extract, _ = finished_run
    written = pq.read_table(rundir.tokens).sort_by("id")
    data = pq.read_table(rundir.data).sort_by("id")
    expected = tokenize_table(data, load_tokenizer(cfg.proxy.model), cfg.proxy)
    assert written.schema.remove_metadata() == TOKEN_SCHEMA and written.num_rows == data.num_rows == ROWS
    for column in TOKEN_SCHEMA.names:
        assert written[column].to_pylist() == expected[column].to_pylist(), column
    # every row is accounted for the same way by tokens, ensemble and gradients
    tokens = rundir.stage_record("tokens")
    no_response = int(np.sum(expected["n_response_tokens"].to_numpy() == 0))
    assert tokens["rows"] == record["rows_in"] == extract["rows"] == ROWS
    assert tokens["rows_no_response_tokens"] == record["rows_no_response_tokens"] == no_response
    assert extract["rows_no_response_tokens"] == no_response
    assert tokens["tokens"] == int(np.sum(expected["n_tokens"].to_numpy()))


def test_ensemble_writes_every_member_epoch_as_safetensors_with_loss_curves(finished_run):
    cfg, rundir, record, _, _ = finished_run
    assert record["rows_in"] == ROWS == record["rows_trained"] + record["rows_no_response_tokens"]
    assert record["adapted_modules"] == 6  # c_attn, attn.c_proj and mlp.c_proj in each of 2 layers
    members = ensemble_members(cfg, rundir.stage_record("tokens")["key"])
    assert record["units"] == {m.unit: f"ensemble/{m.folder}" for m in members}
    assert record["members_trained"] == 2 and record["members_reused"] == 0
    # what this key uses is recorded for `gc`: its members' folders and its trainer's state
    trainer = ensemble_stage.trainer_name(members)
    assert rundir.references("ensemble", record["key"]) == {*record["units"].values(), f".ray_train/{trainer}"}
    # another config's trainer and member are left as they are; this config's finished trainer is removed
    assert rundir.ensemble_train_state.children() == [OTHER_TRAINER]
    assert (rundir.ensemble / OTHER_MEMBER / ensemble_stage.MEMBER_DONE).exists()
    summary = json.loads((rundir.ensemble / "summary.json").read_text())
    assert [(f["folder"], f["seed"], f["trained_now"]) for f in summary["members"].values()] == [
        (m.folder, m.seed, True) for m in members
    ]
    per_member = rundir.stage_record("ensemble")["padding_efficiency_per_member"]  # as the manifest holds it
    assert sorted(str(m) for m in per_member) == [str(m) for m in range(cfg.ensemble.members)]
    # the padding each member recorded is that of its own seed's batches, computed anew from the tokens (trainable
    # rows in id order) and the batching core (that seeds give different batches: tests/test_ensemble_batching.py)
    tokens = pq.read_table(rundir.tokens).sort_by("id")
    response = tokens["n_response_tokens"].to_numpy()
    lengths = np.array([len(ids) for ids in tokens["input_ids"].to_pylist()])[response > 0]
    recorded = {str(m): {str(e): v for e, v in epochs.items()} for m, epochs in per_member.items()}
    for m, member in enumerate(members):
        batches = {e: epoch_batches(lengths, cfg.ensemble, member.seed, e) for e in (1, 2)}
        assert recorded[str(m)] == {str(e): round(padding_stats(lengths, b).efficiency, 4) for e, b in batches.items()}
    assert record["padding_efficiency"] == pytest.approx(
        np.mean([v for epochs in per_member.values() for v in epochs.values()]), abs=1e-4
    )
    for m in range(2):
        for e in (1, 2):
            folder = rundir.member_epoch(m, e)
            assert folder.path == (rundir.ensemble / members[m].folder / f"epoch_{e}").path
            assert Path(folder / "adapter_model.safetensors").stat().st_size > 0
            lines = (folder / "train_loss.csv").read_text().splitlines()
            assert lines[0] == "step,loss" and len(lines) == 1 + int(np.ceil(record["rows_trained"] / 8))
        assert (rundir.ensemble / members[m].folder / ensemble_stage.MEMBER_DONE).exists()
    # only adapters, curves, markers and the summary are published: no optimiser state, nothing left of the first
    # attempt
    files = rundir.ensemble.files()
    assert not [f for f in files if f.endswith(ensemble_stage.TRAIN_STATE)], files
    assert not [f for f in files if f.endswith("stale-from-the-preempted-attempt.txt")] and "summary.json" in files
    assert rundir.stage_done("ensemble", pipeline.stage_key("ensemble", cfg))


def test_resumed_ensemble_equals_an_uninterrupted_one(finished_run, reference_run):
    from safetensors.torch import load_file

    cfg, rundir, _, _, early_before = finished_run
    # epoch 1 was not redone: the committed epoch-1 adapter is byte for byte the preempted run's
    assert (rundir.member_epoch(1, 1) / "adapter_model.safetensors").read_bytes() == early_before

    # The reference CLI run trained the same members (same config, seeds and tokens: same member keys) without
    # interruption, in another process.
    assert reference_run["rc"] == 0, reference_run["log"][-3000:]
    clean = RunDir(str(reference_run["out"]))
    assert [f.name for f in clean.member_folders()] == [f.name for f in rundir.member_folders()]
    for m in range(2):
        a = load_file(str(rundir.member_epoch(m, 2) / "adapter_model.safetensors"))
        b = load_file(str(clean.member_epoch(m, 2) / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    m0 = load_file(str(clean.member_epoch(0, 2) / "adapter_model.safetensors"))
    m1 = load_file(str(clean.member_epoch(1, 2) / "adapter_model.safetensors"))
    assert any(not torch.allclose(m0[k], m1[k]) for k in m0)  # members differ


def _ensemble_files(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ensemble/ but the config's summary: relative path -> (mtime in ns, bytes)."""
    folder = root / "ensemble"
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file() and p.name != "summary.json"
    }


def test_members_are_units_a_new_one_alone_is_trained_and_overlapping_seeds_are_reused(
    finished_run, tmp_path, monkeypatch
):
    from gradfilter_ray.gradients.extract import adapter_name
    from gradfilter_ray.gradients.stage import adapter_locations

    cfg, rundir, record, _, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(rundir.root.path, out)  # a copy keeps each file's modification time
    run = RunDir(str(out))
    before = _ensemble_files(out)
    fits: list[list[str]] = []
    build = ensemble_stage.build_trainer

    def build_and_count(cfg, run, todo, *args, **kwargs):  # the real trainer, noting whom it trains
        fits.append([m.folder for m in todo])
        return build(cfg, run, todo, *args, **kwargs)

    monkeypatch.setattr(ensemble_stage, "build_trainer", build_and_count)

    three = tiny_cfg(out, "ensemble.members=3")
    members = ensemble_members(three, run.stage_record("tokens")["key"])
    started = time.time_ns()
    grown = pipeline.run_stage("ensemble", three, run, **QUIET)
    after = _ensemble_files(out)
    # the first two members: not a byte and not a modification time changed; the third: all new, and finished
    assert {path: after[path] for path in before} == before
    new = {path: mtime for path, (mtime, _) in after.items() if path not in before}
    assert {path.split("/", 1)[0] for path in new} == {members[2].folder}
    assert all(mtime >= started for mtime in new.values())
    assert {f"{members[2].folder}/epoch_{e}/adapter_model.safetensors" for e in (1, 2)} <= set(new)
    assert f"{members[2].folder}/{ensemble_stage.MEMBER_DONE}" in new
    assert fits == [[members[2].folder]]
    assert grown["members_trained"] == 1 and grown["members_reused"] == 2
    assert grown["units"] == {**record["units"], "member_2": f"ensemble/{members[2].folder}"}
    summary = json.loads((run.ensemble / "summary.json").read_text())
    assert summary["trained_now"] == [2] and summary["reused"] == [0, 1]

    # back to two members: both finished, so no trainer at all, and nothing written but the summary
    shrunk = pipeline.run_stage("ensemble", cfg, run, **QUIET)
    assert fits == [[members[2].folder]] and _ensemble_files(out) == after
    assert shrunk["members_trained"] == 0 and shrunk["members_reused"] == 2 and shrunk["units"] == record["units"]
    assert [f["folder"] for f in json.loads((run.ensemble / "summary.json").read_text())["members"].values()] == [
        m.folder for m in members[:2]
    ]

    # the seed shifted by one: seeds 43 and 44 are the three-member config's members 1 and 2
    shifted = pipeline.run_stage("ensemble", tiny_cfg(out, "ensemble.seed=43"), run, **QUIET)
    assert fits == [[members[2].folder]] and _ensemble_files(out) == after
    assert shifted["units"] == {"member_0": grown["units"]["member_1"], "member_1": grown["units"]["member_2"]}
    assert shifted["members_reused"] == 2
    # the extraction reads this config's members through the stage record
    adapters = adapter_locations(run, 1, 2)
    assert [adapters[adapter_name(m, "late")].path for m in (0, 1)] == [
        run.at(f"{grown['units'][unit]}/epoch_2").path for unit in ("member_1", "member_2")
    ]


def test_extraction_has_every_id_once_with_m_values_per_checkpoint(finished_run):
    cfg, rundir, _, extract, _ = finished_run
    grads = pq.read_table(rundir.gradients).sort_by("id")
    data_ids = pq.read_table(rundir.data, columns=["id"])["id"].to_pylist()
    assert grads["id"].to_pylist() == sorted(data_ids) and extract["rows"] == len(data_ids)
    for column in ("sq_norm_early", "sq_norm_late", "loss_early", "loss_late"):
        values = np.array(grads[column].to_pylist())
        assert values.shape == (len(data_ids), 2) and np.isfinite(values).all()
    scored = np.array(grads["n_response_tokens"].to_pylist()) > 0
    assert (np.array(grads["sq_norm_early"].to_pylist())[scored] > 0).all()
    assert extract["examples_per_s"] > 0 and extract["tokens_per_s"] > 0


def test_extraction_equals_bare_computation_and_the_bs1_reference(finished_run):
    from gradfilter_ray.data.prompt import collate_rows
    from gradfilter_ray.data.tokenized import tokenize_table
    from gradfilter_ray.lora import load_adapters
    from gradfilter_ray.models import load_causal_lm, load_tokenizer

    cfg, rundir, _, _, _ = finished_run
    grads = pq.read_table(rundir.gradients).sort_by("id").slice(0, 5)
    data = pq.read_table(rundir.data).sort_by("id").slice(0, 5)
    tokenizer = load_tokenizer(cfg.proxy.model)
    tokens = tokenize_table(data, tokenizer, cfg.proxy)
    base = load_causal_lm(cfg.proxy.model, torch.float64)
    model = load_adapters(base, {"late1": Path(rundir.member_epoch(1, 2))})
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for row in range(5):
        batch = collate_rows([tokens["input_ids"][row].as_py()], [tokens["label_start"][row].as_py()], 0)
        for p in params:
            p.requires_grad_(True)
        logits = model(input_ids=batch["input_ids"]).logits
        target = batch["labels"][0, 1:]
        scored = target != -100
        if not scored.any():
            assert grads["sq_norm_late"][row].as_py()[1] == 0.0
            continue
        loss = torch.nn.functional.cross_entropy(logits[0, :-1][scored], target[scored])
        reference = sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params)).item()
        assert grads["sq_norm_late"][row].as_py()[1] == pytest.approx(reference, rel=1e-4)
        assert grads["loss_late"][row].as_py()[1] == pytest.approx(loss.item(), rel=1e-5)


def test_extraction_is_deterministic(finished_run):
    cfg, rundir, _, _, _ = finished_run
    first = pq.read_table(rundir.gradients).sort_by("id")
    again = pipeline.run_stage("gradients", cfg, rundir, force=True, **QUIET)
    second = pq.read_table(rundir.gradients).sort_by("id")
    assert again["rows"] == first.num_rows
    assert again["shards_computed"] == again["shards"] >= 1 and again["shards_resumed"] == 0  # forced: every shard
    for column in ("sq_norm_early", "sq_norm_late", "loss_late"):
        np.testing.assert_allclose(
            np.array(first[column].to_pylist()), np.array(second[column].to_pylist()), rtol=1e-6
        )


def _stamped_files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder`: relative path -> (mtime in ns, bytes)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_each_config_extracts_into_its_own_folder_and_switching_back_extracts_nothing(finished_run, tmp_path):
    from gradfilter_ray.gradients.shards import PLAN
    from gradfilter_ray.scoring.passes import score_gradients

    cfg, rundir, _, extract, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(rundir.root.path, out)  # a copy keeps each file's modification time
    run = RunDir(str(out))
    key_a = pipeline.stage_key("gradients", cfg)
    folder_a = out / "gradients" / key_a
    assert extract["units"] == {"gradients": f"gradients/{key_a}"} and Path(run.gradients.path) == folder_a
    a_before = _stamped_files(folder_a)

    # another gradients key: its own folder, every shard computed; A's folder keeps every byte and timestamp
    other = tiny_cfg(out, "gradients.precision=float64")
    key_b = pipeline.stage_key("gradients", other)
    folder_b = out / "gradients" / key_b
    b = pipeline.run_stage("gradients", other, run, **QUIET)
    assert key_b != key_a and b["units"] == {"gradients": f"gradients/{key_b}"}
    assert b["shards_computed"] == b["shards"] >= 1 and b["shards_resumed"] == 0 and b["rows"] == ROWS
    assert sorted(p.name for p in (out / "gradients").iterdir()) == sorted([key_a, key_b])
    assert _stamped_files(folder_a) == a_before
    assert Path(run.gradients.path) == folder_b
    assert run.references("gradients") == {f"gradients/{key_a}", f"gradients/{key_b}"}
    b_after = _stamped_files(folder_b)

    # back to A: every shard already committed, none computed (no part or marker rewritten), B's folder untouched
    back = pipeline.run_stage("gradients", cfg, run, **QUIET)
    assert back["shards_computed"] == 0 and back["shards_resumed"] == back["shards"] and back["rows"] == ROWS
    assert back["units"] == extract["units"] and Path(run.gradients.path) == folder_a
    a_again = _stamped_files(folder_a)
    assert a_again[PLAN][1] == a_before[PLAN][1]  # the plan is rewritten with the same content
    assert {k: v for k, v in a_again.items() if k != PLAN} == {k: v for k, v in a_before.items() if k != PLAN}
    assert _stamped_files(folder_b) == b_after

    # scoring reads A's folder: its scores are those of A's gradients, not B's
    pipeline.run_stage("scoring", cfg, run, **QUIET)
    scores = pq.read_table(run.scores).sort_by("id")
    s = cfg.scoring
    for name, folder in (("a", folder_a), ("b", folder_b)):
        score_gradients(run.at(f"gradients/{folder.name}"), run.at(f"check_{name}.parquet"), s.eps, s.random_seed)
    scores_a = pq.read_table(run.at("check_a.parquet")).sort_by("id")
    scores_b = pq.read_table(run.at("check_b.parquet")).sort_by("id")
    assert scores.column_names == scores_a.column_names and scores["id"].equals(scores_a["id"])
    floats = [c for c in scores.column_names if pa.types.is_floating(scores.schema.field(c).type)]
    assert "gsnr" in floats
    for column in floats:
        np.testing.assert_array_equal(scores[column].to_numpy(), scores_a[column].to_numpy(), err_msg=column)
    assert not np.array_equal(scores["gsnr"].to_numpy(), scores_b["gsnr"].to_numpy(), equal_nan=True)


def test_ifd_losses_match_the_frozen_base_computed_directly(finished_run):
    """Superfiltering's IFD inputs on known rows: the base model alone (no adapter), conditioned vs response-only."""
    from gradfilter_ray.data.prompt import alpaca_prompt
    from gradfilter_ray.models import load_causal_lm, load_tokenizer

    cfg, rundir, _, _, _ = finished_run
    grads = pq.read_table(rundir.gradients).sort_by("id").slice(0, 4).to_pylist()
    data = {r["id"]: r for r in pq.read_table(rundir.data).to_pylist()}
    tok = load_tokenizer(cfg.proxy.model)
    base = load_causal_lm(cfg.proxy.model, torch.float64)

    def mean_loss(context_ids, response_ids):
        ids = torch.tensor([context_ids + response_ids])[:, : cfg.proxy.max_length]
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0]
        n_ctx = len(context_ids)
        targets = ids[0, n_ctx:]
        if len(targets) == 0:
            return float("nan")
        return torch.nn.functional.cross_entropy(logits[n_ctx - 1 : -1], targets).item()

    for row in grads:
        rec = data[row["id"]]
        response = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt = tok(alpaca_prompt(rec["instruction"], rec["input"]), add_special_tokens=False)["input_ids"]
        cond = mean_loss(prompt, response)
        uncond = mean_loss([tok.bos_token_id], response)  # GPT-2: <|endoftext|> as the start of the text
        if np.isnan(cond):
            assert np.isnan(row["ifd_loss_cond"])
        else:
            assert row["ifd_loss_cond"] == pytest.approx(cond, rel=1e-5)
        assert row["ifd_loss_uncond"] == pytest.approx(uncond, rel=1e-5)
