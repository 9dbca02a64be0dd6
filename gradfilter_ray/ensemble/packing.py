"""Padding-free packing of one training batch (pure numpy/torch: no Ray, no files).

The SAME rows of the SAME batch (`batching.epoch_batches` decides which rows share a batch; packing never changes
that, since batch composition changes which rows G-SNR selects), laid out without padding: the rows are bin-packed
first-fit-decreasing into a few sequences of at most `max_tokens` tokens (a row is never split; by default the
batch's longest row, so a packed sequence costs at most what one padded row costs: attention is O(L^2) per
sequence). Each row keeps its own `position_ids` (0, 1, ... from its first token) and a block-diagonal causal 4D
additive attention mask lets it see only its own earlier tokens, so every row's logits are the padded batch's up to
float rounding. The pad tail of a packed sequence is masked out too (no row sees it; it sees only itself).

The loss is defined exactly as the padded loop's (`losses.per_example_losses`): per row, the mean cross-entropy of
its labelled tokens, each predicted from the position before it. Labels are taken from `data.prompt.collate_rows`
itself, so the labelled positions (an Alpaca row's response, a conversation's answer spans) are the padded batch's by
construction. Only the positions that predict a labelled token go through the LM head (HF's boolean
`logits_to_keep`), and their token losses are summed per row on the padded batch's [rows, positions] grid, in the
padded loss's order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.losses import IGNORE_INDEX

# Attention implementations that apply a 4D additive mask as given (flash-attention ignores it, flex needs a
# BlockMask): anything else would let packed rows attend to each other.
MASKABLE_ATTENTION = ("sdpa", "eager")
PAD_SEGMENT = -1


def pack_rows(lengths, max_tokens: int | None = None) -> list[np.ndarray]:
    """First-fit-decreasing bins of a batch's rows: each bin an array of row positions (0..n-1 in the batch), in the
    order they sit in the packed sequence. Every row is in exactly one bin and no bin holds more than `max_tokens`
    tokens (default: the longest row; a bound below it is an error). Deterministic: rows are taken longest
    first, ties in batch order, each into the first bin it fits."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError("pack_rows needs a non-empty 1D array of row lengths")
    longest = int(lengths.max())
    bound = longest if max_tokens is None else int(max_tokens)
    if bound < longest:
        raise ValueError(
            f"max_tokens={bound} is below the batch's longest row ({longest} tokens): rows are never split"
        )
    bins: list[list[int]] = []
    room: list[int] = []
    for row in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[row])
        for b, left in enumerate(room):
            if need <= left:
                bins[b].append(row)
                room[b] -= need
                break
        else:
            bins.append([row])
            room.append(bound - need)
    return [np.asarray(b, dtype=np.int64) for b in bins]


@dataclass(frozen=True)
class PackedBatch:
    """One batch of B rows as S packed sequences of L tokens (all [S, L] int64).

    segments: which batch row (0..B-1, the order of the rows as given) each token belongs to, PAD_SEGMENT on the pad
    tail. labels: the padded batch's labels moved to the packed layout, with every row's first token unlabelled (it
    is never predicted, and that keeps a row's last position from predicting the next row). `width` is the padded
    batch's width T (its longest row): the per-row loss sums on a [B, T - 1] grid, as the padded loss does.
    """

    input_ids: Tensor
    position_ids: Tensor
    segments: Tensor
    labels: Tensor
    rows: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def computed_tokens(self) -> int:
        """Tokens the model computes: S sequences x their padded length L."""
        return int(self.input_ids.numel())

    def to(self, device) -> PackedBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            segments=self.segments.to(device),
            labels=self.labels.to(device),
        )

    def keep(self) -> Tensor:
        """[S, L] bool: the positions whose next token is a labelled token of the same row (what the loss needs)."""
        keep = torch.zeros_like(self.labels, dtype=torch.bool)
        keep[:, :-1] = self.labels[:, 1:] != IGNORE_INDEX
        return keep

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """[S, 1, L, L] additive mask: 0.0 where query i may attend key j (same row, j <= i), finfo(dtype).min
        elsewhere, so no row sees the pad tail. The pad tail's own queries see only the pad tail (causally, like one
        more row): a query that sees nothing gives NaN wherever the min turns into -inf (eager's float32 softmax of
        a float64 mask, autocast's bf16 cast of a float32 one), and P @ V would spread that NaN to every row as
        0 * NaN."""
        seg = self.segments
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal
        mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=seg.device)
        return mask.masked_fill_(allowed, 0.0)[:, None]


def pack_batch(input_ids: list, labels_at, pad_id: int, max_tokens: int | None = None, bins=None) -> PackedBatch:
    """The batch's rows (token arrays, with their `TokenRows.labels_at` entries) packed by `pack_rows` (or into the
    given `bins`, as `pack_rows` returns them)."""
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    if bins is None:
        bins = pack_rows(lengths, max_tokens)
    placed = np.concatenate(bins) if len(bins) else np.empty(0, dtype=np.int64)
    if len(placed) != len(lengths) or not np.array_equal(np.sort(placed), np.arange(len(lengths))):
        raise ValueError("bins must hold every row of the batch exactly once")
    # The padded batch's labels, from the collate the padded loop uses: the same labelled positions by construction.
    padded = collate_rows(input_ids, labels_at, pad_id)["labels"].numpy()
    fill = [int(lengths[b].sum()) for b in bins]
    seqs, width = len(bins), max(1, max(fill))
    ids = np.full((seqs, width), pad_id, dtype=np.int64)
    pos = np.zeros((seqs, width), dtype=np.int64)
    seg = np.full((seqs, width), PAD_SEGMENT, dtype=np.int64)
    lab = np.full((seqs, width), IGNORE_INDEX, dtype=np.int64)
    for s, rows in enumerate(bins):
        at = 0
        for row in rows.tolist():
            n = int(lengths[row])
            ids[s, at : at + n] = input_ids[row]
            pos[s, at : at + n] = np.arange(n)
            seg[s, at : at + n] = row
            lab[s, at : at + n] = padded[row, :n]
            if n:
                lab[s, at] = IGNORE_INDEX
            at += n
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        segments=torch.from_numpy(seg),
        labels=torch.from_numpy(lab),
        rows=len(lengths),
        width=padded.shape[1],
    )


def packed_row_losses(kept_logits: Tensor, packed: PackedBatch, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(losses [B], n_response_tokens [B]) as `losses.per_example_losses` gives them for the padded batch, from the
    logits at the packed batch's `keep()` positions ([K, V], in `keep`'s row-major order, as HF's boolean
    `logits_to_keep` returns them). Each row's token losses are summed over its positions in order, on the padded
    [B, T - 1] grid, and divided by its own count; a row without a labelled token gets 0."""
    keep = packed.keep() if keep is None else keep
    targets = packed.labels[:, 1:][keep[:, :-1]]
    rows = packed.segments[keep]
    cols = packed.position_ids[keep]  # the position within its row that predicts the target
    logits = kept_logits.to(torch.promote_types(kept_logits.dtype, torch.float32))  # as per_example_losses upcasts
    token_loss = F.cross_entropy(logits, targets.to(logits.device), reduction="none")
    grid = token_loss.new_zeros(packed.rows, max(packed.width - 1, 0))
    grid = grid.index_put((rows.to(grid.device), cols.to(grid.device)), token_loss)
    n_tokens = torch.bincount(rows, minlength=packed.rows).to(grid.device)
    losses = grid.sum(dim=1) / n_tokens.clamp(min=1).to(grid.dtype)
    return losses, n_tokens


def attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def check_packable(model) -> None:
    """Raise a ValueError unless the model applies a 4D additive attention mask as given (sdpa or eager)."""
    impl = attention_implementation(model)
    if impl not in MASKABLE_ATTENTION:
        raise ValueError(
            f"ensemble.packing needs a model whose attention takes a 4D attention mask (attn_implementation "
            f"{' or '.join(repr(a) for a in MASKABLE_ATTENTION)}), but the proxy model uses attn_implementation="
            f"{impl!r}, which would let the packed rows attend to each other; set ensemble.packing: false or load "
            "the proxy with sdpa or eager attention"
        )


def mask_dtype(model, device_type: str) -> torch.dtype:
    """The dtype the attention scores have: autocast's while it is on (a float32 mask cast to bf16 by autocast would
    turn finfo(float32).min into -inf), else the model's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    embeddings = model.get_input_embeddings()
    return embeddings.weight.dtype if embeddings is not None else torch.get_default_dtype()


def _takes_boolean_keep(model) -> bool:
    """Whether the HF model slices its hidden states with `slice_logits_to_keep` (a 2D boolean `logits_to_keep`
    keeps those positions, flattened); models without it get all logits, indexed here."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(sys.modules.get(type(lm).__module__), "slice_logits_to_keep", None) is not None


def packed_forward(model, packed: PackedBatch) -> tuple[Tensor, Tensor]:
    """One forward of the packed batch (already on the model's device): (logits [K, V] at the `keep()` positions,
    keep [S, L]). Call it inside the autocast the padded forward runs under; the mask follows its dtype."""
    check_packable(model)
    keep = packed.keep()
    boolean_keep = _takes_boolean_keep(model)
    logits = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=packed.attention_mask(mask_dtype(model, packed.input_ids.device.type)),
        logits_to_keep=keep if boolean_keep else 0,
        use_cache=False,
    ).logits
    if logits.dim() == 3:  # all positions came back
        logits = logits[keep]
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"expected logits for {int(keep.sum())} kept positions, got shape {tuple(logits.shape)}")
    return logits, keep


def packed_losses(model, packed: PackedBatch) -> tuple[Tensor, Tensor]:
    """(losses [B], n_response_tokens [B]) of the packed batch: the padded batch's per-example losses up to float
    rounding (`packed_forward`, then `packed_row_losses`)."""
    logits, keep = packed_forward(model, packed)
    return packed_row_losses(logits, packed, keep)
