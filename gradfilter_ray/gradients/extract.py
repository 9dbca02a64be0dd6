"""One block of tokenised rows -> its rows of `gradients/` (pure torch + Arrow: no Ray, no files).

`extract_block` is what each extraction actor does per block, given the proxy with all 2M adapters loaded (M members
x early/late, named by `adapter_name`): it cuts the block into batches of rows sorted by length under a token
budget (`batching`), runs the exact per-example norm kernel once per adapter and batch, and Superfiltering's two IFD
losses on the frozen base; a batch that runs out of device memory is split and retried (`batch_runner`). Every value
is per example (own normalisation, padding masked, dropout off), so it does not depend on batch-mates, batch size,
token budget or block boundaries.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.gradients.batch_runner import BatchRunner
from gradfilter_ray.gradients.head_loss import response_losses
from gradfilter_ray.gradients.norms import per_example_sq_norms

CHECKPOINTS = ("early", "late")

GRADIENT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("sq_norm_early", pa.list_(pa.float64())),
        ("sq_norm_late", pa.list_(pa.float64())),
        ("loss_early", pa.list_(pa.float64())),
        ("loss_late", pa.list_(pa.float64())),
        ("n_response_tokens", pa.int32()),
        ("n_tokens", pa.int32()),
        ("ifd_loss_cond", pa.float64()),
        ("ifd_loss_uncond", pa.float64()),
    ]
)


def adapter_name(member: int, checkpoint: str) -> str:
    return f"m{member}_{checkpoint}"


def extract_block(
    model: torch.nn.Module,
    tokens: pa.Table,
    *,
    members: int,
    device: torch.device,
    pad_id: int,
    batch_size: int,
    tokens_per_batch: int | None = None,
    loss_chunk_tokens: int = 2048,
    head_dtype: torch.dtype | None = torch.float32,
    stats: dict | None = None,
) -> pa.Table:
    """`tokens` (data.tokenized.TOKEN_SCHEMA rows) -> GRADIENT_SCHEMA rows in the same order.

    `model` is a PeftModel over the frozen proxy holding the adapters `adapter_name(m, c)` for every member m and
    checkpoint c; its weights sit on `device`. A batch holds at most `batch_size` rows and, unless
    `tokens_per_batch` is None, rows x padded length <= tokens_per_batch (a longer row goes alone); at most
    `loss_chunk_tokens` positions of vocabulary-wide logits exist at a time, computed in `head_dtype` (None: the
    model's dtype). `stats`, when given, gets the norm
    pass's batches, padded_tokens (rows x padded length) and real_tokens (each batch runs once per adapter), and
    oom_splits over all passes (the two forward-only IFD passes and the norms).
    """
    input_ids = tokens["input_ids"].to_numpy(zero_copy_only=False)
    starts = _labels_at(tokens)
    lengths = np.array([len(x) for x in input_ids], dtype=np.int32)
    n = len(lengths)
    runner = BatchRunner(tokens["id"].to_numpy(), batch_size, tokens_per_batch, device, stats)
    ifd_cond = base_losses(model, input_ids, starts, runner, pad_id, device, loss_chunk_tokens, head_dtype)
    ifd_uncond = base_losses(
        model,
        tokens["response_input_ids"].to_numpy(zero_copy_only=False),
        tokens["response_label_start"].to_numpy(),
        runner,
        pad_id,
        device,
        loss_chunk_tokens,
        head_dtype,
    )
    results = {f"{kind}_{c}": np.zeros((n, members)) for kind in ("sq_norm", "loss") for c in CHECKPOINTS}
    n_response = np.zeros(n, dtype=np.int32)

    def norms(rows: np.ndarray) -> None:
        batch = _device_batch(input_ids, starts, rows, pad_id, device)
        for member in range(members):
            for checkpoint in CHECKPOINTS:
                sq, loss, count = per_example_sq_norms(
                    model,
                    **batch,
                    adapter_name=adapter_name(member, checkpoint),
                    loss_chunk_tokens=loss_chunk_tokens,
                    head_dtype=head_dtype,
                )
                results[f"sq_norm_{checkpoint}"][rows, member] = sq.numpy()
                results[f"loss_{checkpoint}"][rows, member] = loss.numpy()
                n_response[rows] = count.numpy()

    runner.run(lengths, norms)
    return pa.Table.from_arrays(
        [
            tokens["id"],
            *(_list_column(results[name]) for name in GRADIENT_SCHEMA.names[1:5]),
            pa.array(n_response),
            pa.array(lengths),
            pa.array(ifd_cond),
            pa.array(ifd_uncond),
        ],
        schema=GRADIENT_SCHEMA,
    )


def base_losses(
    model,
    input_ids,
    starts: np.ndarray,
    runner: BatchRunner,
    pad_id: int,
    device: torch.device,
    chunk_tokens: int,
    head_dtype: torch.dtype | None = torch.float32,
) -> np.ndarray:
    """Each row's mean response-token loss under the frozen base (adapters off; NaN where no token is scored):
    IFD's conditioned pass on prompt + response, its unconditioned pass on the response alone. Forward only."""
    losses = np.zeros(len(starts))

    def forward(rows: np.ndarray) -> None:
        batch = _device_batch(input_ids, starts, rows, pad_id, device)
        with torch.no_grad(), model.disable_adapter():
            loss, count = response_losses(model, **batch, chunk_tokens=chunk_tokens, head_dtype=head_dtype)
        losses[rows] = np.where(count.cpu().numpy() > 0, loss.double().cpu().numpy(), np.nan)

    runner.run(np.array([len(x) for x in input_ids]), forward, counted=False)
    return losses


def _labels_at(tokens: pa.Table) -> np.ndarray:
    """Each row's labelled positions: its flat loss spans (TOKEN_SCHEMA), or its first labelled position (older
    token tables, and callers that build rows by hand)."""
    if "loss_spans" not in tokens.column_names:
        return tokens["label_start"].to_numpy()
    at = np.empty(tokens.num_rows, dtype=object)
    at[:] = list(tokens["loss_spans"].to_numpy(zero_copy_only=False))
    return at


def _device_batch(input_ids, starts: np.ndarray, rows: np.ndarray, pad_id: int, device: torch.device) -> dict:
    batch = collate_rows([input_ids[i] for i in rows], starts[rows], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _list_column(values: np.ndarray) -> pa.Array:
    """[N, M] float64 -> list<float64> column of N lists of M."""
    n, m = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float64()))
