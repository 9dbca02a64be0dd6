"""Tokens, ensemble and extraction stages on the session's local Ray with a tiny GPT-2: outputs, resume (a preempted
attempt is not done, and its re-run replaces every old output), exactly-once, tokens/ equal to tokenising in-process,
equality with a bare in-process computation and with the batch-size-1 reference, determinism."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.rundir import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_gpt2.yaml"
QUIET = {"log": lambda _: None}


def tiny_cfg(out, *extra):
    return load(TINY, [f"output_dir={out}", "data.limit=24", "ensemble.members=2", *extra])


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    """ingest -> tokens -> ensemble (interrupted after epoch 1, then resumed) -> extract, once for the module."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = tiny_cfg(out)
    rundir = RunDir(str(out))
    pipeline.run_stage("data", cfg, rundir, **QUIET)
    pipeline.run_stage("tokens", cfg, rundir, **QUIET)
    # A preempted first attempt: the trainer stops after epoch 1, leaving its checkpoint and (written in place)
    # epoch 1 of each member in ensemble/, but no record: the stage is not done.
    key = pipeline.stage_key("ensemble", cfg)
    rundir.begin_stage("ensemble", key, pipeline.STAGES["ensemble"].writes)
    partial = ensemble_stage.build_trainer(
        cfg, rundir, key, ensemble_stage.token_dataset(rundir), stop_after_epoch=1
    ).fit()
    assert partial.error is None and partial.metrics["epoch"] == 1
    with partial.checkpoint.as_directory() as saved:
        early_before = (Path(saved) / "member_1" / "epoch_1" / "adapter_model.safetensors").read_bytes()
        assert not (Path(saved) / "member_1" / "epoch_2").exists()
    assert (rundir.member_epoch(1, 1) / "adapter_model.safetensors").read_bytes() == early_before
    assert not rundir.member_epoch(1, 2).exists() and not rundir.stage_done("ensemble", key)
    # A file the preempted attempt left in ensemble/ that the finished stage does not write: the re-run replaces
    # every old output, so it must be gone afterwards.
    (rundir.ensemble / "stale-from-the-preempted-attempt.txt").write_text("stale")
    # An earlier config's trainer folder: removed; this config's (the preempted attempt's) is resumed from.
    (rundir.ensemble_train_state / "ensemble-0123abcd" / "checkpoint_x" / "state").write_bytes(b"x")
    drop = RunDir.drop_other_trainers
    left: list[list[str]] = []

    def drop_and_look(self, train_state, this_config):  # what the trainer finds once other configs' are gone
        dropped = drop(self, train_state, this_config)
        left.append(train_state.children())
        return dropped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDir, "drop_other_trainers", drop_and_look)
        record = pipeline.run_stage("ensemble", cfg, rundir, **QUIET)
    assert left == [[ensemble_stage.trainer_name(key)]]  # the preempted attempt's trainer is kept to resume from
    extract = pipeline.run_stage("gradients", cfg, rundir, **QUIET)
    return cfg, rundir, record, extract, early_before


def test_tokens_stage_equals_tokenizing_in_process_token_by_token(finished_run):
    from gradfilter_ray.data.tokenized import TOKEN_SCHEMA, tokenize_table
    from gradfilter_ray.models import load_tokenizer

    cfg, rundir, record, extract, _ = finished_run
    written = pq.read_table(rundir.tokens).sort_by("id")
    data = pq.read_table(rundir.data).sort_by("id")
    expected = tokenize_table(data, load_tokenizer(cfg.proxy.model), cfg.proxy)
    assert written.schema.remove_metadata() == TOKEN_SCHEMA and written.num_rows == data.num_rows == 24
    for column in TOKEN_SCHEMA.names:
        assert written[column].to_pylist() == expected[column].to_pylist(), column
    # every row is accounted for the same way by tokens, ensemble and gradients
    tokens = rundir.stage_record("tokens")
    no_response = int(np.sum(expected["n_response_tokens"].to_numpy() == 0))
    assert tokens["rows"] == record["rows_in"] == extract["rows"] == 24
    assert tokens["rows_no_response_tokens"] == record["rows_no_response_tokens"] == no_response
    assert extract["rows_no_response_tokens"] == no_response
    assert tokens["tokens"] == int(np.sum(expected["n_tokens"].to_numpy()))


def test_ensemble_writes_every_member_epoch_as_safetensors_with_loss_curves(finished_run):
    cfg, rundir, record, _, _ = finished_run
    assert record["rows_in"] == 24 == record["rows_trained"] + record["rows_no_response_tokens"]
    assert record["adapted_modules"] == 6  # c_attn, attn.c_proj and mlp.c_proj in each of 2 layers
    assert record["trainers_of_other_configs_removed"] == 1 and not rundir.ensemble_train_state.children()
    per_member = rundir.stage_record("ensemble")["padding_efficiency_per_member"]  # as the manifest holds it
    assert sorted(str(m) for m in per_member) == [str(m) for m in range(cfg.ensemble.members)]
    assert all(0 < v <= 1 for epochs in per_member.values() for v in epochs.values())
    assert len({json.dumps(epochs, sort_keys=True) for epochs in per_member.values()}) > 1  # each its own order
    assert record["padding_efficiency"] == pytest.approx(
        np.mean([v for epochs in per_member.values() for v in epochs.values()]), abs=1e-4
    )
    for m in range(2):
        for e in (1, 2):
            folder = rundir.member_epoch(m, e)
            assert Path(folder / "adapter_model.safetensors").stat().st_size > 0
            lines = (folder / "train_loss.csv").read_text().splitlines()
            assert lines[0] == "step,loss" and len(lines) == 1 + int(np.ceil(record["rows_trained"] / 8))
    # only adapters, curves and the summary are published: no optimiser state, nothing left of the first attempt
    files = rundir.ensemble.files()
    assert not [f for f in files if f.endswith(ensemble_stage.TRAIN_STATE)], files
    assert "stale-from-the-preempted-attempt.txt" not in files and "summary.json" in files
    assert rundir.stage_done("ensemble", pipeline.stage_key("ensemble", cfg))
    # the finished stage removed its Ray Train run (checkpoints are only for resuming)
    assert not (rundir.ensemble_train_state / ensemble_stage.trainer_name(record["key"])).exists()


def test_resumed_ensemble_equals_an_uninterrupted_one(finished_run, tmp_path):
    from safetensors.torch import load_file

    cfg, rundir, _, _, early_before = finished_run
    # epoch 1 was not redone: the committed epoch-1 adapter is byte for byte the preempted run's
    assert (rundir.member_epoch(1, 1) / "adapter_model.safetensors").read_bytes() == early_before

    clean = RunDir(str(tmp_path / "clean"))
    clean_cfg = tiny_cfg(clean.root)
    for stage in ("data", "tokens", "ensemble"):
        pipeline.run_stage(stage, clean_cfg, clean, **QUIET)
    for m in range(2):
        a = load_file(str(rundir.member_epoch(m, 2) / "adapter_model.safetensors"))
        b = load_file(str(clean.member_epoch(m, 2) / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    m0 = load_file(str(clean.member_epoch(0, 2) / "adapter_model.safetensors"))
    m1 = load_file(str(clean.member_epoch(1, 2) / "adapter_model.safetensors"))
    assert any(not torch.allclose(m0[k], m1[k]) for k in m0)  # members differ


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
    for column in ("sq_norm_early", "sq_norm_late", "loss_late"):
        np.testing.assert_allclose(
            np.array(first[column].to_pylist()), np.array(second[column].to_pylist()), rtol=1e-6
        )


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
