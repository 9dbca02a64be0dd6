"""Per-example response losses without the [B, T, vocab] logits: the backbone's last hidden states at each row's own
labelled positions go through the LM head in chunks (`losses.per_example_losses_from_hidden`).

That is only the model's loss when its logits are exactly head(backbone(x).last_hidden_state). `head_path` checks
the structure (a backbone under `base_model_prefix`, a plain nn.Linear head that no adapter wraps, no logit
softcapping or scaling in the config) and, once per model, that a short probe gives the model's own logits. Any other
model falls back, with a warning, to its own forward over HF's `logits_to_keep` window: exact, but it holds
[B, window, vocab] logits (the memory this module exists to avoid).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfilter_ray.losses import per_example_losses, per_example_losses_from_hidden, scored_window

# Config attributes with which HF causal LMs post-process lm_head's output (Gemma 2/3 softcapping, Cohere's
# logit_scale, Granite's logits_scaling, ...): a value other than these means logits != head(hidden).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
}
_PROBE_TOKENS = 4


@dataclass(frozen=True)
class HeadPath:
    backbone: nn.Module
    head: nn.Linear


# Per model: the head its probe ran with and the probe's verdict; and the fallback reasons already warned about.
_probed: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, str | None]] = weakref.WeakKeyDictionary()
_warned: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def head_path(model: nn.Module) -> HeadPath | None:
    """(backbone, head) of the causal LM under `model` (a PeftModel or a bare HF model), or None when its logits are
    not head(last hidden state). The structure is checked on every call (adapters may wrap the head later), the probe
    once per model and head; call it before attaching forward hooks (the probe runs the model)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    path, reason = _find(lm)
    if path is not None:
        seen = _probed.get(lm)
        if seen is None or seen[0] is not path.head:
            seen = _probed[lm] = (path.head, _probe(lm, path))
        reason = seen[1]
    if reason is None:
        return path
    if reason not in _warned.setdefault(lm, set()):
        _warned[lm].add(reason)
        warnings.warn(
            f"{type(lm).__name__}: {reason}; per-example losses use the model's own logits window instead of the "
            "chunked LM head (exact, but holds [batch, window, vocab] logits)",
            stacklevel=2,
        )
    return None


def response_losses(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    chunk_tokens: int,
    head_dtype: torch.dtype | None = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(losses [B], n_response_tokens [B]) as `losses.per_example_losses` defines them, from one forward of `model`
    in its current adapter state; differentiable when grad mode is on. The head's logits are computed in
    `head_dtype` (None: the model's dtype; see `per_example_losses_from_hidden`); the fallback path has the model's
    own logits, in its dtype."""
    path = head_path(model)
    if path is None:
        window = scored_window(labels)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=window
        ).logits
        return per_example_losses(logits, labels[:, -window:])
    hidden = path.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return per_example_losses_from_hidden(hidden, labels, path.head.weight, path.head.bias, chunk_tokens, head_dtype)


def _find(lm: nn.Module) -> tuple[HeadPath | None, str | None]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs = [getattr(lm, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    for cfg in filter(None, configs):
        for attr, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, attr, None)
            if value not in neutral:
                return None, f"its config sets {attr}={value!r}, so its logits are not lm_head(hidden)"
    prefix = getattr(lm, "base_model_prefix", "")
    backbone = getattr(lm, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is lm:
        return None, f"no backbone module under base_model_prefix {prefix!r}"
    try:
        head = lm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if not isinstance(head, nn.Linear) or isinstance(head, BaseTunerLayer):
        return None, f"its output head is {type(head).__name__}, not a plain Linear (adapted or wrapped?)"
    return HeadPath(backbone, head), None


def _probe(lm: nn.Module, path: HeadPath) -> str | None:
    """None when head(backbone(x)) reproduces lm(x).logits on a few tokens, else why not."""
    device = path.head.weight.device
    ids = torch.arange(min(_PROBE_TOKENS, path.head.out_features), device=device)[None]
    try:
        with _eval(lm), torch.no_grad():
            want = lm(input_ids=ids, use_cache=False).logits
            hidden = path.backbone(input_ids=ids, use_cache=False).last_hidden_state
            got = F.linear(hidden, path.head.weight, path.head.bias)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the model's own forward
        return f"the head-path probe failed ({type(exc).__name__}: {exc})"
    # The same kernels on the same inputs: anything beyond rounding is a transform the probe has found.
    scale = float(want.abs().max().clamp(min=1e-30))
    if want.shape != got.shape or not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5 * scale):
        return "lm_head(last hidden state) does not reproduce its logits"
    return None


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
