"""The evaluation keeps every finished run across a crash: `stage.run_waves` hands each run of a wave to `finished`
(which writes its folder, `_done` last) as soon as that wave is over, before the next wave is built, and a run that
fails (its dataset, its stream or its check) stops the waves only once its wave-mates are written; the vllm
engine's two phases (answers, then held-out losses) go wave by wave alike. No Ray: the datasets are stand-ins that
stream Arrow tables as a Ray Data dataset's `iter_batches` does."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gradfilter_ray.evaluation import stage
from gradfilter_ray.evaluation.hf_engine import GENERATE, HELDOUT, with_results
from gradfilter_ray.storage import open_location
from gradfilter_ray.units import unit_finished

ROWS = [
    {"kind": GENERATE, "test_set": "vicuna", "id": "v1", "instruction": "Say hi.", "input": "", "output": ""},
    {"kind": HELDOUT, "test_set": "alpaca_eval_805", "id": "a1", "instruction": "Add", "input": "1, 2", "output": "3"},
]


class Streamed:
    """What `collect` reads of a dataset: its rows in batches, here in reverse order (as parallel actors may)."""

    def __init__(self, run: str, fails: bool = False) -> None:
        self.run, self.fails = run, fails

    def iter_batches(self, batch_format: str, batch_size):
        assert batch_format == "pyarrow" and batch_size is None
        table = with_results(stage.sorted_table(ROWS), [f"answer of {self.run}", None], [float("nan"), 4.0], [0, 2])
        yield table.slice(1)
        if self.fails:
            raise RuntimeError(f"the actors of {self.run} died")
        yield table.slice(0, 1)


KEYS = {run: f"{i:016x}" for i, run in enumerate("abcdefg")}


def test_each_wave_is_written_before_the_next_is_built_and_a_failure_keeps_its_wave_mates(tmp_path):
    events: list[tuple[str, str]] = []

    def build(run: str, actors: int) -> Streamed:
        events.append(("build", run))
        if run == "d":
            raise RuntimeError("d's model folder is unreadable")
        return Streamed(run, fails=run == "c")

    def finished(run: str, table: pa.Table) -> None:
        assert table[stage.POSITION].to_pylist() == [0, 1]  # back in order
        events.append(("written", run))
        if run == "f":
            raise RuntimeError("f returned too few rows")
        stage.write_run(open_location(str(tmp_path / run)), table, KEYS[run])

    waves = [{"a": 1, "b": 1}, {"c": 1, "d": 1, "e": 1, "f": 1}, {"g": 4}]
    with pytest.raises(RuntimeError, match="the actors of c died"):  # the wave's first failure, in run order
        stage.run_waves(waves, build, finished)
    first_wave = [("build", "a"), ("build", "b"), ("written", "a"), ("written", "b")]
    second_wave = [("build", run) for run in "cdef"] + [("written", "e"), ("written", "f")]
    assert events == first_wave + second_wave  # the third wave never built
    finished_runs = [run for run in "abcdefg" if unit_finished(open_location(str(tmp_path / run)), KEYS[run])]
    assert finished_runs == ["a", "b", "e"]
    assert '"answer": "answer of e"' in (tmp_path / "e" / "generations.jsonl").read_text()


def test_a_wave_without_failures_goes_on_to_the_next():
    written: list[str] = []
    stage.run_waves([{"a": 2}, {"b": 1, "c": 1}], lambda run, _: Streamed(run), lambda run, _: written.append(run))
    assert written == ["a", "b", "c"]


def test_the_vllm_engine_answers_then_scores_each_wave_before_the_next_and_finishes_the_runs_that_got_through():
    events: list[tuple[str, ...]] = []

    def phase(name: str, failing: str):
        def run(wave: dict[str, int], finished) -> None:
            events.append((name, *wave))
            stage.run_waves([wave], lambda r, _: Streamed(r, fails=r == failing), lambda r, t: finished(r, name))

        return run

    def finished(run: str, answers, scored) -> None:
        events.append(("finished", run, answers, scored))

    waves = [{"a": 1, "b": 1}, {"c": 2}]
    with pytest.raises(RuntimeError, match="the actors of b died"):
        stage.answer_then_score(waves, waves, phase("answers", "b"), phase("losses", ""), finished)
    # b failed to answer: a is still scored and finished, and the second wave never starts
    assert events == [("answers", "a", "b"), ("losses", "a"), ("finished", "a", "answers", "losses")]

    events.clear()
    with pytest.raises(RuntimeError, match="the actors of c died"):
        stage.answer_then_score(waves, waves, phase("answers", ""), phase("losses", "c"), finished)
    finished_first = [("finished", "a", "answers", "losses"), ("finished", "b", "answers", "losses")]
    assert events == [("answers", "a", "b"), ("losses", "a", "b"), *finished_first, ("answers", "c"), ("losses", "c")]

    events.clear()  # no held-out rows: a run is finished once answered
    stage.answer_then_score(waves, [], phase("answers", ""), phase("losses", ""), finished)
    assert [e for e in events if e[0] == "finished"] == [("finished", r, "answers", None) for r in "abc"]
