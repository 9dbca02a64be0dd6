"""Runs per-batch work over a block's rows in token-budget batches, and survives running out of device memory.

A batch whose work runs out of device memory (`is_out_of_memory`: torch.OutOfMemoryError, or a RuntimeError of a
CUDA library that failed to allocate) is split in halves and retried (down to single rows); the first batch that
then succeeds sets a lower token budget for the rest of the block, so one OOM does not become one per batch. Every
result is per example, so how rows are grouped never changes a value. A row that does not fit even alone raises
`RowDoesNotFitError`, naming it. Any other error is raised as it is.

Each batch's work is preceded by `faults.fault_point("gradients.batch", rows=..., tokens=...)`: tests inject OOM
there.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

from gradfilter_ray.faults import fault_point
from gradfilter_ray.gradients.batching import padded_tokens, token_budget_batches

STAT_KEYS = ("batches", "oom_splits", "padded_tokens", "real_tokens")
# What an allocation failure says when it surfaces as a plain RuntimeError rather than torch.OutOfMemoryError: a
# cudaMalloc outside the caching allocator ("CUDA error: out of memory"), a cuBLAS or cuDNN handle or workspace
# ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"), the host allocator on CPU ("DefaultCPUAllocator: can't
# allocate memory"). Not "illegal memory access" or any other CUDA error: those corrupt the context, and a retry
# would only fail again, or worse.
OUT_OF_MEMORY = re.compile(r"\bout of memory\b|\b[A-Z]+_STATUS_ALLOC_FAILED\b|can't allocate memory", re.IGNORECASE)


class RowDoesNotFitError(RuntimeError):
    """One row's work ran out of device memory with nothing else in its batch."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device (or host) could not allocate: a split batch may fit where this one did not.
    A row that did not fit alone is a verdict, not a failure to retry."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RowDoesNotFitError) or not isinstance(exc, RuntimeError):
        return False
    return bool(OUT_OF_MEMORY.search(str(exc)))


class BatchRunner:
    """One per block: the token budget it lowers after an OOM holds for all of the block's passes."""

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        tokens_per_batch: int | None,
        device: torch.device,
        stats: dict | None = None,
    ) -> None:
        self.ids = ids
        self.batch_size = batch_size
        self.budget = tokens_per_batch
        self.device = torch.device(device)
        self.stats = stats if stats is not None else {}
        for key in STAT_KEYS:
            self.stats.setdefault(key, 0)
        self._lower_to: int | None = None  # after an OOM: half the failed batch's tokens, applied once one fits

    def run(self, lengths: np.ndarray, work: Callable[[np.ndarray], None], counted: bool = True) -> None:
        """Call `work(rows)` (row indices into the block, ascending length) until every row has been done once.
        `counted`: add this pass's batches and tokens to the stats (OOM splits are always counted)."""
        lengths = np.asarray(lengths)
        plan = token_budget_batches(lengths, self.batch_size, self.budget)
        while plan:
            budget = self.budget
            self._run_batch(plan.pop(0), lengths, work, counted)
            if self.budget != budget and plan:
                rest = np.concatenate(plan)  # still in ascending length order: re-plan under the lower budget
                plan = [rest[b] for b in token_budget_batches(lengths[rest], self.batch_size, self.budget)]

    def _run_batch(
        self, rows: np.ndarray, lengths: np.ndarray, work: Callable[[np.ndarray], None], counted: bool
    ) -> None:
        pending = [rows]
        while pending:
            part = pending.pop()
            tokens = padded_tokens(lengths[part])
            if len(part) > 1 and self.budget is not None and tokens > self.budget:
                pending += _halves(part)  # formed before the budget was lowered
                continue
            try:
                fault_point("gradients.batch", rows=len(part), tokens=tokens)  # may raise an injected OOM
                work(part)
                failed = False
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                if len(part) == 1:
                    raise RowDoesNotFitError(
                        f"row id {int(self.ids[part[0]])} ({int(lengths[part[0]])} tokens) runs out of memory on "
                        f"{self.device} even in a batch of its own: lower proxy.max_length or use a larger device"
                    ) from exc
                failed = True
            # Out of the except block: the exception and the frames holding the failed batch's tensors are gone.
            if failed:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.stats["oom_splits"] += 1
                half = max(1, tokens // 2)
                self._lower_to = half if self._lower_to is None else min(self._lower_to, half)
                pending += _halves(part)
                continue
            if self._lower_to is not None:
                # Half of what failed, not the size of the first part that fitted: that part is the short-rows half
                # and would leave the budget several times smaller than what the device holds.
                lowered = max(self._lower_to, tokens)
                self.budget = lowered if self.budget is None else min(self.budget, lowered)
                self._lower_to = None
            if self.budget is not None:
                self.stats["tokens_per_batch"] = self.budget  # the budget in force: the actor carries it on
            if counted:
                self.stats["batches"] += 1
                self.stats["padded_tokens"] += tokens
                self.stats["real_tokens"] += int(lengths[part].sum())


def _halves(rows: np.ndarray) -> list[np.ndarray]:
    """The two halves, in the order `pending.pop()` takes them: shorter rows first."""
    half = (len(rows) + 1) // 2
    return [rows[half:], rows[:half]]
