"""Fine-tuning at scale, the pure parts: each rank's share of a subset tokenised once and read back by all in
order, the row ranges those shares read, how many subsets fit side by side on a cluster, the offloaded optimiser
choice, and the checkpoint accounting carried across resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradfilter_ray.config import Config, FinetuneConfig, ModelSpec, load
from gradfilter_ray.finetune.checkpoints import CheckpointWrites
from gradfilter_ray.finetune.ds_config import deepspeed_config, plan_training, use_cpu_adam
from gradfilter_ray.finetune.loop import tokenize_subset
from gradfilter_ray.finetune.placement import subsets_side_by_side
from gradfilter_ray.finetune.subset_tokens import PackedRows, rows_from_tables, rows_to_table, share_bounds
from gradfilter_ray.models import load_tokenizer
from gradfilter_ray.parquet_stream import read_row_range
from gradfilter_ray.storage import open_location

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


@pytest.mark.parametrize("n,world", [(0, 3), (1, 4), (10, 3), (1000, 8), (7, 7)])
def test_shares_cover_every_row_once_and_differ_by_at_most_one(n, world):
    bounds = [share_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_packed_rows_hold_exactly_the_lists():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50_000, size=int(n)).tolist() for n in rng.integers(0, 40, size=200)]
    packed = PackedRows.from_lists(rows)
    assert len(packed) == 200 and packed.tokens.dtype == np.int32
    assert all(packed[i].tolist() == rows[i] for i in range(200))


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_shares_tokenised_apart_equal_the_subset_tokenised_whole(template):
    """The shared copy is exact: tokenising 3 shares and reading them back in order gives the same rows, labelled
    positions and counts as tokenising the subset in one piece (including rows dropped for no response token), for
    Alpaca rows and for multi-turn conversations (several label spans a row)."""
    import json

    from test_data_chat_tokens import CHATML
    from test_data_conversations import GLAIVE

    from gradfilter_ray.data.formats import normalize_record

    if template == "alpaca":
        data = json.loads((REPO / "gradfilter_ray" / "assets" / "data" / "alpaca_sample_1k.json").read_text())[:40]
        table = pa.table({k: [r[k] for r in data] for k in ("instruction", "input", "output")})
        max_length = 48  # short: some prompts fill it, so some rows have no response token
    else:
        records = json.loads(GLAIVE.read_text())[:30]
        long_question = {"from": "human", "value": "why? " * 400}
        records.insert(7, {"conversations": [long_question, {"from": "gpt", "value": "Because."}]})
        rows = [normalize_record(r, 100_000) for r in records]
        table = pa.table({k: [r[k] for r in rows] for k in ("instruction", "input", "output", "conversation")})
        max_length = 400  # whole trailing turns dropped; the long question leaves no room for its answer
    spec = ModelSpec(name_or_path="bundled:stories260K")
    finetune = FinetuneConfig(model=spec, max_length=max_length, template=template, chat_template=CHATML)
    tokenizer = load_tokenizer(spec)
    whole = tokenize_subset(tokenizer, table, finetune)
    assert whole.rows_no_response_tokens > 0
    parts = []
    for rank in range(3):
        start, stop = share_bounds(table.num_rows, 3, rank)
        share = tokenize_subset(tokenizer, table.slice(start, stop - start), finetune)
        parts.append(rows_to_table(share.input_ids, share.labels_at, share.rows_in, share.rows_no_response_tokens))
    # through Parquet, as the ranks exchange them
    parts = [pq.read_table(pa.BufferReader(_parquet_bytes(t))) for t in parts]
    packed, labels_at, rows_in, dropped = rows_from_tables(parts)
    assert (rows_in, dropped) == (whole.rows_in, whole.rows_no_response_tokens)
    assert [packed[i].tolist() for i in range(len(packed))] == [x.tolist() for x in whole.input_ids]
    assert [list(a) for a in labels_at] == [list(a) for a in whole.labels_at]
    if template == "chat":
        assert any(len(a) > 2 for a in labels_at)  # several answers under the loss in one row


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_a_row_range_reads_across_files_and_row_groups(tmp_path):
    folder = tmp_path / "rows"
    folder.mkdir()
    ids = np.arange(1000)
    for k, (lo, hi) in enumerate([(0, 300), (300, 310), (310, 1000)]):
        pq.write_table(
            pa.table({"id": ids[lo:hi], "x": ids[lo:hi] * 2}), folder / f"part-{k}.parquet", row_group_size=64
        )
    where = open_location(str(folder))
    for lo, hi in [(0, 0), (0, 1000), (250, 320), (299, 301), (305, 309), (999, 1000), (990, 2000)]:
        got = read_row_range(where, lo, hi, ["id"])["id"].to_numpy()
        np.testing.assert_array_equal(got, ids[lo : min(hi, 1000)])


def _nodes(*gpus: int, cpus: int = 64) -> list[dict]:
    return [{"CPU": cpus, "GPU": g} for g in gpus]


def test_subsets_side_by_side_on_the_shipped_7b_config():
    """8 workers of 1 GPU per subset, one node each (STRICT_PACK): two 8-GPU nodes train two subsets at once; a
    node of 4 GPUs holds none of them (and a 12-GPU cluster of 3 such nodes still none: no subset spans nodes)."""
    cfg = load(CONFIGS / "alpaca_llama2_7b.yaml")
    finetune = cfg.finetune
    assert (finetune.num_workers, finetune.gpus_per_worker, finetune.placement_strategy) == (8, 1, "STRICT_PACK")
    assert subsets_side_by_side(cfg, _nodes(8)) == 1
    assert subsets_side_by_side(cfg, _nodes(8, 8)) == 2
    assert subsets_side_by_side(cfg, _nodes(8, 8, 4)) == 2
    assert subsets_side_by_side(cfg, _nodes(4, 4, 4)) == 0
    assert subsets_side_by_side(cfg, _nodes(16)) == 2
    assert subsets_side_by_side(cfg, _nodes(0)) == 0  # a CPU-only head node adds nothing


def test_side_by_side_spans_nodes_only_when_asked_and_counts_cpus_on_cpu():
    packed = Config(finetune=FinetuneConfig(num_workers=8, gpus_per_worker=1, placement_strategy="PACK"))
    assert subsets_side_by_side(packed, _nodes(4, 4, 4)) == 1
    on_cpu = Config(finetune=FinetuneConfig(num_workers=2, gpus_per_worker=0, cpus_per_worker=1))
    assert subsets_side_by_side(on_cpu, [{"CPU": 2}]) == 1 and subsets_side_by_side(on_cpu, [{"CPU": 5}]) == 2
    assert subsets_side_by_side(Config(finetune=FinetuneConfig(parallel_subsets=3)), _nodes(8)) == 3  # the user's word


@pytest.mark.parametrize(
    "offload,setting,prebuilt,expected",
    [
        (False, "always", True, False),  # nothing offloaded: the GPU optimiser
        (True, "auto", True, True),
        (True, "auto", False, False),  # not prebuilt: no JIT build on every fresh node unless asked
        (True, "always", False, True),
        (True, "never", True, False),
    ],
)
def test_the_offloaded_step_uses_deepspeeds_cpu_adam_where_it_can(offload, setting, prebuilt, expected):
    finetune = FinetuneConfig(offload_optimizer=offload, cpu_adam=setting)
    assert use_cpu_adam(finetune, prebuilt) is expected
    config = deepspeed_config(finetune, plan_training(100, finetune, 8), bf16=True, cpu_adam=expected)
    if offload:
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert config["zero_force_ds_cpu_optimizer"] is expected  # torch's AdamW must be declared intended


def test_checkpoint_writes_survive_the_state_file():
    writes = CheckpointWrites(steps=[41, 82], bytes=2 * 84_000_000_000, staged_bytes=0, seconds=123.4567)
    again = CheckpointWrites.from_dict(writes.as_dict())
    assert again == CheckpointWrites([41, 82], 168_000_000_000, 0, 123.457) and again.count == 2


def test_a_subset_of_conversations_with_tools_is_trained_with_them_in_context(tmp_path):
    """A selection file as the selection stage writes it (all of data/'s columns), read by the fine-tuning worker's
    own share reader: rows listing tools carry their definitions (a template that writes them), the others not."""
    import json

    from test_data_chat_tokens import CHATML_TOOLS
    from test_data_conversations import GLAIVE

    from gradfilter_ray.data.formats import CANONICAL_COLUMNS, normalize_record
    from gradfilter_ray.finetune.worker import shared_subset_rows

    rows = [normalize_record(r, 100_000) for r in json.loads(GLAIVE.read_text())[:12]]
    for i, row in enumerate(rows):
        row.update(id=i, source_file="glaive.json", source_row=i)
    pq.write_table(
        pa.Table.from_pylist([{c: r[c] for c in CANONICAL_COLUMNS} for r in rows]), tmp_path / "sel.parquet"
    )
    spec = ModelSpec(name_or_path="bundled:stories260K")
    finetune = FinetuneConfig(model=spec, max_length=4096, template="chat", chat_template=CHATML_TOOLS)
    tokenizer = load_tokenizer(spec)
    got = shared_subset_rows(
        tokenizer, open_location(str(tmp_path / "sel.parquet")), open_location(str(tmp_path / "tok")), finetune, 0, 1
    )
    header = tokenizer("<|im_start|>system\nFunctions:", add_special_tokens=False)["input_ids"]
    starts = [got.input_ids[i][: len(header)].tolist() == header for i in range(len(rows))]
    assert starts == [r["tools"] is not None for r in rows] and any(starts) and not all(starts)


# ----- a subset's key: what its training computes from, and nothing else -----


def _subset_rows(texts: list[str], **extra_columns) -> pa.Table:
    n = len(texts)
    columns = {
        "id": list(range(100, 100 + n)),
        "instruction": [f"do {t}" for t in texts],
        "input": [""] * n,
        "output": texts,
        "conversation": [None] * (n - 1) + ['[{"role": "user", "content": "hi"}]'],
        "tools": [None] * n,
        "source_file": ["a.json"] * n,
        "gsnr": np.linspace(0, 1, n),
    }
    return pa.table({**columns, **extra_columns})


def _key(table: pa.Table, *overrides: str) -> str:
    from gradfilter_ray.finetune.keys import rows_digest, subset_key

    return subset_key(load(None, list(overrides)), rows_digest(table.to_batches(max_chunksize=3)))


def test_the_subset_key_changes_with_the_recipe_the_base_model_and_the_rows():
    table = _subset_rows([f"answer {i}" for i in range(10)])
    base = _key(table)
    assert _key(table, "finetune.learning_rate=0.001") != base
    assert _key(table, "finetune.micro_batch_size=2") != base
    assert _key(table, "finetune.model.name_or_path=bundled:stories260K") != base
    assert _key(table, "finetune.num_workers=3") != base  # 4 x 3 x 11: 132 rows a step, not 128
    edited = table.set_column(3, "output", pa.array([f"answer {i}" for i in range(9)] + ["answer 9!"]))
    assert _key(edited) != base
    assert _key(table.slice(0, 9)) != base  # a row fewer
    reordered = pa.concat_tables([table.slice(5), table.slice(0, 5)])
    assert _key(reordered) != base  # the training reads its rows in this order
    conversation = table.set_column(4, "conversation", pa.array([None] * 10, pa.string()))
    assert _key(conversation) != base  # a null conversation is not the text of one


def test_the_subset_key_ignores_what_only_picks_or_places_subsets_and_the_metadata_columns():
    table = _subset_rows([f"answer {i}" for i in range(10)])
    base = _key(table)
    for override in [
        "finetune.num_workers=4",  # 4 x 4 x 8: still 128 rows a step
        "finetune.parallel_subsets=2",
        "finetune.checkpoint=none",
        "finetune.max_failures=5",
        "finetune.placement_strategy=PACK",
        "finetune.scorers=[gsnr]",
        "finetune.ratios=[0.05, 0.1]",
        "finetune.full=true",
        "selection.ratios=[0.2]",
        "evaluation.max_new_tokens=3",
    ]:
        assert _key(table, override) == base, override
    relabelled = table.set_column(6, "source_file", pa.array(["b.json"] * 10)).set_column(
        7, "gsnr", pa.array(np.zeros(10))
    )
    assert _key(relabelled.append_column("loo_selected", pa.array([1] * 10))) == base


def test_the_rows_digest_streams_the_same_over_any_batches_and_files(tmp_path):
    """The digest is a function of the rows alone: the same whatever the batch size, the files the rows are cut
    into, and string or large string columns; it reads the files batch by batch."""
    from gradfilter_ray.finetune.keys import rows_digest
    from gradfilter_ray.parquet_stream import stream_batches

    table = _subset_rows([f"answer {i} " * (i % 4) for i in range(50)])
    whole = rows_digest([table])
    assert rows_digest(table.to_batches(max_chunksize=7)) == whole
    assert rows_digest([table.cast(table.schema.set(3, pa.field("output", pa.large_string())))]) == whole
    folder = tmp_path / "rows"
    folder.mkdir()
    for k, (lo, hi) in enumerate([(0, 13), (13, 14), (14, 50)]):
        pq.write_table(table.slice(lo, hi - lo), folder / f"part-{k}.parquet", row_group_size=5)
    assert rows_digest(stream_batches(open_location(str(folder)), batch_rows=4)) == whole


def test_a_text_column_the_tokenisation_reads_is_digested(monkeypatch):
    """The digest reads what the tokenisation reads (data.tokenized.TEXT_COLUMNS): a column added there changes
    the key of rows that differ in it alone."""
    from gradfilter_ray.data import tokenized

    table = _subset_rows([f"answer {i}" for i in range(10)])
    plain = table.append_column("system", pa.array(["be brief"] * 10))
    other = table.append_column("system", pa.array(["be long"] * 10))
    assert _key(plain) == _key(other)  # not read by the tokenisation: not digested
    monkeypatch.setattr(tokenized, "TEXT_COLUMNS", [*tokenized.TEXT_COLUMNS, "system"])
    assert _key(plain) != _key(other)


# ----- a subset's trainer: named by its key and the shape its resumable state depends on -----


def test_the_trainer_is_named_by_the_subset_key_and_the_shape_its_state_depends_on():
    from gradfilter_ray.finetune.keys import trainer_name

    def trainer(*overrides: str) -> str:
        return trainer_name(load(None, list(overrides)), "0123456789abcdef", "gsnr_0.1")

    base = trainer()
    assert base.startswith("finetune-0123456789abcdef-") and base.endswith("-gsnr_0.1")
    assert trainer_name(load(None, []), "fedcba9876543210", "gsnr_0.1") != base
    assert trainer_name(load(None, []), "0123456789abcdef", "gsnr_0.2") != base
    # the same rows per step (the same subset key) on half the workers: other token shares, another partitioning
    table = _subset_rows([f"answer {i}" for i in range(10)])
    assert _key(table, "finetune.num_workers=4") == _key(table)
    assert trainer("finetune.num_workers=4") != base
    assert trainer("finetune.zero_stage=2") != base  # the default is 3
    assert trainer("finetune.offload_optimizer=true") != base
    offloaded = trainer("finetune.offload_optimizer=true")
    assert trainer("finetune.offload_optimizer=true", "finetune.cpu_adam=never") != offloaded
    assert trainer("finetune.gpus_per_worker=0") != base
    for override in [
        "finetune.cpu_adam=never",  # without offload no step runs on CPU: the same optimiser either way
        "finetune.max_failures=5",
        "finetune.checkpoint=none",
        "finetune.parallel_subsets=2",
        "finetune.placement_strategy=PACK",
        "finetune.cpus_per_worker=4",
        "finetune.gpus_per_worker=0.5",
    ]:
        assert trainer(override) == base, override
    assert trainer("finetune.checkpoint=steps", "finetune.checkpoint_every_steps=3") == base


def test_shares_are_this_worlds_only_one_per_rank_each_its_share_of_the_rows():
    from gradfilter_ray.finetune.subset_tokens import share_file, share_rank, shares_mismatch

    def shares(n: int, world: int) -> dict[int, int]:
        return {r: stop - start for r, (start, stop) in enumerate(share_bounds(n, world, r) for r in range(world))}

    assert shares_mismatch(shares(10, 4), 10, 4) is None
    assert shares_mismatch(shares(10, 1), 10, 1) is None
    assert shares_mismatch(shares(0, 2), 0, 2) is None
    assert shares_mismatch(shares(10, 8), 10, 4) is not None  # 8 -> 4 workers: parts 0-3 hold half the rows
    assert shares_mismatch({r: n for r, n in shares(10, 8).items() if r < 4}, 10, 4) is not None
    # 4 -> 8 workers: ranks 0-3 find their parts of the 4-rank trainer (a quarter each), ranks 4-7 write theirs
    assert shares_mismatch({**shares(80, 8), **shares(80, 4)}, 80, 8) is not None
    assert shares_mismatch({0: 6, 1: 4}, 10, 2) is not None  # every row, but not split as this world splits it
    assert shares_mismatch({0: 5}, 10, 2) is not None  # a rank's share missing
    assert shares_mismatch(shares(12, 4), 10, 4) is not None  # shares of other rows
    assert [share_rank(share_file(r)) for r in (0, 7, 123)] == [0, 7, 123]
    assert share_rank(".part-00000.parquet.1a2b3c4d.tmp") is None and share_rank("checkpoint_step_0000002") is None


def test_stale_shares_of_another_world_are_tokenised_again(tmp_path):
    """A tokens folder holding the two shares a 2-rank trainer wrote, read by a 1-rank one: the rank finds a part of
    its own name, sees that it covers half the rows, and trains on the whole subset tokenised again (no Ray: one
    rank)."""
    import json

    from gradfilter_ray.finetune.subset_tokens import share_file
    from gradfilter_ray.finetune.worker import shared_subset_rows, shares_found

    data = json.loads((REPO / "gradfilter_ray" / "assets" / "data" / "alpaca_sample_1k.json").read_text())
    table = pa.table({k: [r[k] for r in data[:20]] for k in ("instruction", "input", "output")})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows_at, tokens_at = open_location(str(tmp_path / "rows.parquet")), open_location(str(tmp_path / "tokens"))
    spec = ModelSpec(name_or_path="bundled:stories260K")
    finetune = FinetuneConfig(model=spec, max_length=128)
    tokenizer = load_tokenizer(spec)
    (tmp_path / "tokens").mkdir()
    for rank in range(2):
        half = tokenize_subset(tokenizer, table.slice(10 * rank, 10), finetune)
        stale = rows_to_table(half.input_ids, half.labels_at, half.rows_in, half.rows_no_response_tokens)
        pq.write_table(stale, tmp_path / "tokens" / share_file(rank))
    assert shares_found(tokens_at) == {0: 10, 1: 10}
    rows = shared_subset_rows(tokenizer, rows_at, tokens_at, finetune, 0, 1)
    whole = tokenize_subset(tokenizer, table, finetune)
    assert rows.rows_in == 20 and shares_found(tokens_at) == {0: 20}
    assert [rows.input_ids[i].tolist() for i in range(len(rows))] == [list(x) for x in whole.input_ids]


def test_a_forced_run_trains_every_subset_from_its_first_step_and_leaves_other_trainers(tmp_path):
    """Unforced, the subsets to train are those without a finished folder, and nothing is deleted; forced, every
    subset of the config, its folder and its trainer (checkpoints, tokens) deleted first; another config's trainer
    of the same subset stays."""
    from gradfilter_ray.finetune.stage import Subset, subsets_to_train
    from gradfilter_ray.rundir import RunDir
    from gradfilter_ray.scoring.scorers import Selection
    from gradfilter_ray.units import DONE_MARKER

    run = RunDir(str(tmp_path / "run"))
    done = Subset(Selection("gsnr", 0.1), "0123456789abcdef", "finetune-0123456789abcdef-aaaaaaaa-gsnr_0.1")
    cut_short = Subset(Selection("gsnr", 0.2), "fedcba9876543210", "finetune-fedcba9876543210-aaaaaaaa-gsnr_0.2")
    (run.finetune / done.folder / DONE_MARKER).write_text(done.key)
    (run.finetune / cut_short.folder / "train_loss.csv").write_text("step,loss\n")
    for trainer in (done.trainer, cut_short.trainer, "finetune-fedcba9876543210-bbbbbbbb-gsnr_0.2"):
        (run.finetune_train_state / trainer / "tokens" / "part-00000.parquet").write_bytes(b"x")
    everything = sorted(Path(tmp_path).rglob("*"))

    assert subsets_to_train(run, [done, cut_short]) == [cut_short]
    assert sorted(Path(tmp_path).rglob("*")) == everything
    assert subsets_to_train(run, [done, cut_short], force=True) == [done, cut_short]
    assert not (run.finetune / done.folder).exists() and not (run.finetune / cut_short.folder).exists()
    assert run.finetune_train_state.children() == ["finetune-fedcba9876543210-bbbbbbbb-gsnr_0.2"]
