"""One block of tokenised rows -> its rows of `gradients/` (pure torch + Arrow: no Ray, no files).

`extract_block` is what each extraction actor does per block, given the proxy with all 2M adapters loaded (M members
x early/late, named by `adapter_name`): it sorts the block by length (less padding), runs the exact per-example norm
kernel once per adapter and sub-batch of `batch_size`, and Superfiltering's two IFD losses on the frozen base. Every
value is per example (own normalisation, padding masked, dropout off), so it does not depend on batch-mates, batch
size or block boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.gradients.norms import per_example_sq_norms
from gradfilter_ray.losses import per_example_losses, scored_window

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
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> pa.Table:
    """`tokens` (data.tokenized.TOKEN_SCHEMA rows) -> GRADIENT_SCHEMA rows in the same order.

    `model` is a PeftModel over the frozen proxy holding the adapters `adapter_name(m, c)` for every member m and
    checkpoint c; its weights sit on `device`.
    """
    input_ids = tokens["input_ids"].to_numpy(zero_copy_only=False)
    starts = tokens["label_start"].to_numpy()
    lengths = np.array([len(x) for x in input_ids], dtype=np.int32)
    n = len(lengths)
    ifd_cond = base_losses(model, input_ids, starts, batch_size, pad_id, device)
    ifd_uncond = base_losses(
        model,
        tokens["response_input_ids"].to_numpy(zero_copy_only=False),
        tokens["response_label_start"].to_numpy(),
        batch_size,
        pad_id,
        device,
    )
    results = {f"{kind}_{c}": np.zeros((n, members)) for kind in ("sq_norm", "loss") for c in CHECKPOINTS}
    n_response = np.zeros(n, dtype=np.int32)
    for rows, batch in length_batches(input_ids, starts, batch_size, pad_id, device):
        for member in range(members):
            for checkpoint in CHECKPOINTS:
                sq, loss, count = per_example_sq_norms(model, **batch, adapter_name=adapter_name(member, checkpoint))
                results[f"sq_norm_{checkpoint}"][rows, member] = sq.numpy()
                results[f"loss_{checkpoint}"][rows, member] = loss.numpy()
                n_response[rows] = count.numpy()
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


def length_batches(
    input_ids, starts: np.ndarray, batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(row indices, device batch) over rows sorted by length, so batch-mates pad little."""
    order = np.argsort([len(x) for x in input_ids], kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        batch = collate_rows([input_ids[i] for i in rows], starts[rows], pad_id)
        yield rows, {k: v.to(device) for k, v in batch.items()}


def base_losses(
    model, input_ids, starts: np.ndarray, batch_size: int, pad_id: int, device: torch.device
) -> np.ndarray:
    """Each row's mean response-token loss under the frozen base (adapters off; NaN where no token is scored):
    IFD's conditioned pass on prompt + response, its unconditioned pass on the response alone. Forward only."""
    losses = np.zeros(len(starts))
    for rows, batch in length_batches(input_ids, starts, batch_size, pad_id, device):
        window = scored_window(batch["labels"])
        with torch.no_grad(), model.disable_adapter():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window
            ).logits
            loss, count = per_example_losses(logits, batch["labels"][:, -window:])
        losses[rows] = np.where(count.cpu().numpy() > 0, loss.double().cpu().numpy(), np.nan)
    return losses


def _list_column(values: np.ndarray) -> pa.Array:
    """[N, M] float64 -> list<float64> column of N lists of M."""
    n, m = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float64()))
