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
