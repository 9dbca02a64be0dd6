"""Running out of device memory mid-block is survivable: the batch is split in halves and retried, the rest of the
block runs under half the token count that failed, and the block's values are those of a run without the fault. A row
that does not fit alone fails with an error that names it. An allocation failure that a CUDA library reports as a
plain RuntimeError counts as OOM; no other error does. OOM is injected through the fault seam
(`faults.fault_point("gradients.batch", rows=..., tokens=...)`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gradients_budget import assert_same_block, extraction_setup, one_torch_thread, run_block  # noqa: F401

from gradfilter_ray import faults
from gradfilter_ray.gradients.batch_runner import BatchRunner, RowDoesNotFitError, is_out_of_memory
from gradfilter_ray.gradients.batching import padded_tokens


class InjectedOOM:
    """A fault handler: OOM for every "gradients.batch" whose rows or tokens exceed a limit; records the calls."""

    def __init__(self, max_rows: int | None = None, max_tokens: int | None = None) -> None:
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.calls: list[tuple[int, int, bool]] = []  # (rows, tokens, raised)

    def __call__(self, name: str, **context) -> None:
        if name != "gradients.batch":
            return
        rows, tokens = context["rows"], context["tokens"]
        raised = (self.max_rows is not None and rows > self.max_rows) or (
            self.max_tokens is not None and tokens > self.max_tokens
        )
        self.calls.append((rows, tokens, raised))
        if raised:
            raise torch.OutOfMemoryError(f"injected: {rows} rows, {tokens} tokens")


@pytest.fixture
def inject(monkeypatch):
    """Puts a handler behind the seam, as if GFR_FAULT_HANDLER had named it (restored after the test)."""

    def install(handler: InjectedOOM) -> InjectedOOM:
        monkeypatch.setattr(faults, "_loaded", True)
        monkeypatch.setattr(faults, "_handler", handler)
        return handler

    return install


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return extraction_setup(tmp_path_factory.mktemp("adapters"))


def test_a_block_with_oom_on_every_batch_over_two_rows_equals_the_fault_free_run(setup, inject):
    clean = run_block(setup, batch_size=4)
    handler = inject(InjectedOOM(max_rows=2))
    stats: dict = {}
    faulted = run_block(setup, batch_size=4, stats=stats)
    assert_same_block(faulted, clean)
    assert stats["oom_splits"] > 0 and stats["oom_splits"] == sum(raised for *_, raised in handler.calls)
    assert all(rows <= 2 for rows, _, raised in handler.calls if not raised)
    assert stats["real_tokens"] == sum(len(x) for x in setup[1]["input_ids"].to_pylist())


def test_a_row_that_does_not_fit_alone_names_itself(setup, inject):
    _, tokens, _ = setup
    inject(InjectedOOM(max_rows=0))
    lengths = [len(x) for x in tokens["input_ids"].to_pylist()]
    first = int(np.argsort(lengths, kind="stable")[0])  # halving tries the shortest rows first
    with pytest.raises(RowDoesNotFitError, match=rf"row id {tokens['id'][first].as_py()} \({lengths[first]} tokens\)"):
        run_block(setup, batch_size=4)


def test_after_an_oom_the_rest_of_the_block_runs_under_half_the_failed_size(inject):
    handler = inject(InjectedOOM(max_tokens=100))
    lengths = np.array([10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 45, 90, 100])
    done: list[int] = []
    stats: dict = {}
    runner = BatchRunner(np.arange(100, 100 + len(lengths)), 8, None, torch.device("cpu"), stats)
    runner.run(lengths[::-1].copy(), lambda rows: done.extend(rows.tolist()))

    assert sorted(done) == list(range(len(lengths)))  # every row once, although batches failed
    # The first batch (8 rows, 8 x 24 tokens) fails; its first half (4 x 16 tokens) fits and the budget becomes half
    # of what failed, 96 (not the 64 of the short half that happened to run first), so the second half (4 x 24) runs.
    assert handler.calls[:3] == [(8, 8 * 24, True), (4, 4 * 16, False), (4, 4 * 24, False)]
    assert runner.budget == 96 and stats["tokens_per_batch"] == 96
    # The rest of the block is planned under that budget: no batch over it but single rows, no further OOM.
    assert all(tokens <= 96 or rows == 1 for rows, tokens, _ in handler.calls[1:])
    assert (3, 3 * 30, False) in handler.calls and (1, 100, False) in handler.calls
    assert stats["oom_splits"] == 1 and stats["batches"] == len(handler.calls) - 1


def test_a_single_row_over_budget_that_fails_raises_and_the_cuda_cache_is_emptied_on_cuda_only(inject, monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    inject(InjectedOOM(max_tokens=50))
    runner = BatchRunner(np.array([7, 8, 9]), 4, 1000, torch.device("cpu"))
    with pytest.raises(RowDoesNotFitError, match=r"row id 9 \(60 tokens\)"):
        runner.run(np.array([10, 20, 60]), lambda rows: None)
    assert runner.stats["oom_splits"] == 1 and runner.budget == 90 and not emptied  # half of the failed 3 x 60
    on_cuda = BatchRunner(np.array([7, 8]), 4, None, torch.device("cuda"))  # the work is fake: no GPU needed
    on_cuda.run(np.array([10, 20]), lambda rows: None)
    assert on_cuda.stats["oom_splits"] == 0 and not emptied
    inject(InjectedOOM(max_rows=1))
    on_cuda.run(np.array([10, 20]), lambda rows: None)
    assert on_cuda.stats["oom_splits"] == 1 and emptied == [1]
    assert padded_tokens([10, 20]) == 40


def test_oom_raised_by_the_work_itself_is_handled_like_an_injected_one():
    calls = []

    def work(rows: np.ndarray) -> None:
        calls.append(len(rows))
        if len(rows) > 1:
            raise torch.OutOfMemoryError("real")

    runner = BatchRunner(np.arange(5), 5, None, torch.device("cpu"))
    runner.run(np.full(5, 3), work)
    assert calls[0] == 5 and sorted(c for c in calls if c == 1) == [1] * 5
    assert runner.stats["batches"] == 5


OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, max allowed: 18.13 GB)",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "8589934592 bytes. Error code 12 (Cannot allocate memory)",
]
OTHER_ERRORS = [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k, ...)`",
    "CUDA error: CUBLAS_STATUS_NOT_SUPPORTED",
    "mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)",
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
    "memory format is not supported",
    "timeout of memoryless wait",
]


def test_out_of_memory_is_recognised_by_type_or_by_an_allocation_failures_message_only():
    assert is_out_of_memory(torch.OutOfMemoryError("anything"))
    for message in OOM_MESSAGES:
        assert is_out_of_memory(RuntimeError(message)), message
    for message in OTHER_ERRORS:
        assert not is_out_of_memory(RuntimeError(message)), message
    assert not is_out_of_memory(ValueError("CUDA out of memory"))  # not an error torch raises for an allocation
    assert not is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RowDoesNotFitError("row id 3 (9 tokens) runs out of memory on cuda:0 even alone"))


@pytest.mark.parametrize("message", OOM_MESSAGES[1:4])
def test_an_allocation_failure_raised_as_runtime_error_is_split_like_an_oom(message):
    calls = []

    def work(rows: np.ndarray) -> None:
        calls.append(len(rows))
        if len(rows) > 2:
            raise RuntimeError(message)

    runner = BatchRunner(np.arange(6), 6, None, torch.device("cpu"))
    runner.run(np.full(6, 4), work)
    # 6 rows fail, then their first half of 3; its 2 + 1 fit and set the budget to 8 tokens (half of the 3 x 4 that
    # failed, raised to the 2 x 4 that fit), under which the other half of 3 is split before it is tried.
    assert calls == [6, 3, 2, 1, 2, 1]
    assert runner.stats["oom_splits"] == 2 and runner.stats["batches"] == 4 and runner.budget == 8


def test_any_other_runtime_error_is_raised_as_it_is_without_a_retry():
    calls = []

    def work(rows: np.ndarray) -> None:
        calls.append(len(rows))
        raise RuntimeError(OTHER_ERRORS[0])

    runner = BatchRunner(np.arange(6), 6, None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="illegal memory access") as raised:
        runner.run(np.full(6, 4), work)
    assert type(raised.value) is RuntimeError and calls == [6] and runner.stats["oom_splits"] == 0
