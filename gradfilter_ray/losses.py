"""The response-only loss every stage shares: per example, the mean token cross-entropy over its response."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def per_example_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits [B, T, V], labels [B, T] (unshifted, -100 = not scored) -> (losses [B], n_response_tokens [B]).

    Each example is normalised by its own token count (not the batch's, as HF's default loss does), so its value
    and gradient do not depend on its batch-mates; a row with no scored token gets loss 0.
    """
    batch = labels.shape[0]
    target = labels[:, 1:].to(logits.device)
    n_tokens = (target != IGNORE_INDEX).sum(dim=1)
    # Upcast like HF's loss does: bf16 cross-entropy would dominate the error budget.
    shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = F.cross_entropy(shifted.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    losses = token_loss.view(batch, -1).sum(dim=1) / n_tokens.clamp(min=1).to(token_loss.dtype)
    return losses, n_tokens


def scored_window(labels: Tensor) -> int:
    """How many trailing positions of the logits the loss needs: from one before the batch's first labelled token.

    Passed as HF's ``logits_to_keep``, this skips the LM head (and the [B, T, vocab] logits, the largest tensor with
    GPT-2's 50k vocabulary) on the prompt. Pair it with ``labels[:, -window:]`` in `per_example_losses`.
    """
    scored = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if not bool(scored.any()):
        return 1
    first = int(torch.nonzero(scored)[0]) + 1  # position of the first labelled token in any row
    return labels.shape[1] - first + 1


def per_example_losses_from_hidden(
    hidden: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    chunk_tokens: int = 2048,
    head_dtype: torch.dtype | None = torch.float32,
) -> tuple[Tensor, Tensor]:
    """`per_example_losses(hidden @ weight.T + bias, labels)` without the [B, T, V] logits.

    hidden [B, T, H]: the LM's last hidden states (final norm applied); weight [V, H] / bias [V]: its output head,
    treated as frozen (no gradient flows to it). Only each row's own labelled positions (t with labels[i, t+1] !=
    -100) go through the head, `chunk_tokens` of them at a time, in forward and in backward; the cross-entropy is
    computed in float32 or better whatever the model dtype. The logits are computed in `head_dtype` (or the model's
    dtype when wider) from the model's own operands: GPT-2's logits sit near -100, where bf16's spacing
    is 0.5, so rounding them to bf16 shifts each by up to a quarter nat; None keeps the model's dtype. Same contract
    as `per_example_losses`: (losses [B], n_response_tokens [B]), own-count normalisation, a row without a scored
    token gets loss 0.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    target = labels[:, 1:].to(hidden.device)
    scored = target != IGNORE_INDEX
    n_tokens = scored.sum(dim=1)
    token_loss = _ChunkedHeadCrossEntropy.apply(
        hidden[:, :-1][scored],
        weight.detach(),
        None if bias is None else bias.detach(),
        target[scored],
        chunk_tokens,
        torch.is_grad_enabled() and hidden.requires_grad,  # forward-only callers skip the gradient matmul
        hidden.dtype if head_dtype is None else torch.promote_types(hidden.dtype, head_dtype),
    )
    # Back onto the [B, T-1] grid so that each row sums its own tokens in position order, as per_example_losses does:
    # a row's value then does not depend on its batch-mates, down to the rounding.
    per_position = token_loss.new_zeros(scored.shape).masked_scatter(scored, token_loss)
    losses = per_position.sum(dim=1) / n_tokens.clamp(min=1).to(per_position.dtype)
    return losses, n_tokens


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Token cross-entropies of `hidden @ weight.T + bias` ([N, H] -> [N]), `chunk` rows of logits at a time.

    Each token's loss depends on its own hidden state only, so the gradient w.r.t. hidden is that of a unit
    upstream gradient scaled per row: it is computed in forward, chunk by chunk, while the chunk's logits exist, and
    backward only scales it. That keeps the head at one logits matmul and one input-gradient matmul per position (no
    recomputation) and the largest live tensor at [chunk, V]. The logits are computed in `logit_dtype` (the operands
    upcast: a bf16 value is exact in float32) and the softmax in float32 or better; the head gets no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk: int,
        want_grad: bool,
        logit_dtype: torch.dtype,
    ) -> Tensor:
        acc = torch.promote_types(logit_dtype, torch.float32)
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        unit_grad = torch.empty_like(hidden) if want_grad else None
        weight = weight.to(logit_dtype)  # once per call, not per chunk (a no-op when the dtypes agree)
        bias = None if bias is None else bias.to(logit_dtype)
        for begin in range(0, n, chunk):
            end = min(begin + chunk, n)
            logits = F.linear(hidden[begin:end].to(logit_dtype), weight, bias).to(acc)
            target = targets[begin:end, None]
            picked = logits.gather(1, target).squeeze(1)
            # log-sum-exp in place, so one [chunk, V] buffer is all this chunk holds
            peak = logits.amax(dim=1, keepdim=True)
            logits.sub_(peak).exp_()
            total = logits.sum(dim=1, keepdim=True)
            losses[begin:end] = (total.log() + peak - picked[:, None]).squeeze(1)
            if want_grad:
                logits.div_(total)  # softmax
                logits.scatter_add_(1, target, torch.full_like(picked[:, None], -1.0))  # minus one-hot
                unit_grad[begin:end] = logits.to(weight.dtype) @ weight
            del logits
        ctx.save_for_backward(unit_grad)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (unit_grad,) = ctx.saved_tensors
        grad_hidden = (unit_grad.to(grad.dtype) * grad[:, None]).to(unit_grad.dtype)
        return grad_hidden, None, None, None, None, None, None
