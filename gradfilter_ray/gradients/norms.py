"""Exact per-example squared gradient norms over a LoRA adapter, from one batched forward and one backward.

For a Linear y = x W^T (+ b) applied at every token, example i's weight gradient is G_i = sum_t g_{i,t}^T x_{i,t}
(g = dL/dy). Capturing x (forward hook) and g (autograd.grad w.r.t. the captured outputs) for every lora_A / lora_B
Linear gives every G_i with one bmm per module, without materialising per-example gradients of the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from torch import Tensor, nn

from gradfilter_ray.lora import lora_layers, resolve_adapter
from gradfilter_ray.losses import IGNORE_INDEX, per_example_losses, scored_window

__all__ = ["IGNORE_INDEX", "per_example_sq_norms"]


def _activate(model: nn.Module, names: list[str]) -> None:
    # PeftModel.set_adapter keeps PeftModel.active_adapter in sync but takes one name; LoraModel takes a list.
    if isinstance(model, PeftModel) and len(names) == 1:
        model.set_adapter(names[0])
    else:
        (model.base_model if isinstance(model, PeftModel) else model).set_adapter(names)


@contextlib.contextmanager
def _scoring_state(model: nn.Module, adapter_name: str, params: list[nn.Parameter]) -> Iterator[None]:
    """eval() everywhere, adapter active, its params differentiable; all of it restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    prev_active = list(model.active_adapters)
    try:
        model.eval()  # dropout off: the reference gradient is that of the deterministic eval-mode loss
        if prev_active != [adapter_name]:
            _activate(model, [adapter_name])  # also rewrites requires_grad flags; restored below
        for p in params:
            p.requires_grad_(True)  # needed so the LoRA outputs are part of the graph
        yield
    finally:
        if list(model.active_adapters) != prev_active:
            _activate(model, prev_active)
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.training = tr


def _per_example_sq(x: Tensor, g: Tensor, with_bias: bool, acc: torch.dtype) -> Tensor:
    """x [B, T, in], g [B, T, out] -> ||sum_t g_t^T x_t||_F^2 (+ ||sum_t g_t||^2 for the bias), shape [B]."""
    x, g = x.to(acc), g.to(acc)
    sq = torch.bmm(g.transpose(1, 2), x).pow(2).sum(dim=(1, 2))
    if with_bias:
        sq = sq + g.sum(dim=1).pow(2).sum(dim=1)
    return sq


def per_example_sq_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    adapter_name: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-example ||d loss_i / d theta||^2 over all LoRA A/B params of one adapter.

    input_ids, attention_mask, labels: [B, T] long, right-padded; labels are -100 outside the response and are
    unshifted (HF convention). loss_i is the mean token cross-entropy over example i's predicted response tokens
    (labels[i, 1:] != -100), computed in eval mode. Returns CPU tensors (sq_norms [B] float64, losses [B] float64,
    n_response_tokens [B] int64); a row without response tokens yields (0, 0, 0).
    """
    name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, name)
    lins = [lin for _, m in layers for lin in (m.lora_A[name], m.lora_B[name])]
    params = [p for lin in lins for p in lin.parameters()]
    B = input_ids.shape[0]
    acc = torch.promote_types(params[0].dtype, torch.float32)
    captured: dict[nn.Linear, list[tuple[Tensor, Tensor]]] = {lin: [] for lin in lins}

    def hook(mod: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        captured[mod].append((inputs[0], out))

    handles = []
    try:
        with _scoring_state(model, name, params), torch.inference_mode(False), torch.enable_grad():
            handles = [lin.register_forward_hook(hook) for lin in lins]
            window = scored_window(labels)
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=window
            ).logits
            for h in handles:
                h.remove()
            handles = []
            missing = [lin for lin, calls in captured.items() if not calls]
            if missing:
                raise RuntimeError(f"{len(missing)} LoRA modules of {name!r} were not called (adapters disabled?)")

            losses, n_tok = per_example_losses(logits, labels[:, -window:])

            outs = [o for calls in captured.values() for _, o in calls]
            grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)

            keep = attention_mask.to(logits.device).bool()[:, :, None]
            sq = torch.zeros(B, dtype=acc, device=logits.device)
            k = 0
            for lin, calls in captured.items():
                xs, gs = [], []
                for x, o in calls:
                    g = grads[k] if grads[k] is not None else torch.zeros_like(o)
                    k += 1
                    x, g = x.reshape(B, -1, x.shape[-1]), g.reshape(B, -1, g.shape[-1])
                    if x.shape[1] == keep.shape[1]:
                        # g is exactly 0 on padding; masking also keeps non-finite padded activations out of bmm.
                        x, g = x.masked_fill(~keep, 0), g.masked_fill(~keep, 0)
                    xs.append(x)
                    gs.append(g)
                # A module called several times per forward (weight sharing) sums its contributions over calls.
                x, g = (xs[0], gs[0]) if len(xs) == 1 else (torch.cat(xs, 1), torch.cat(gs, 1))
                sq += _per_example_sq(x, g, lin.bias is not None, acc)
        return (
            sq.detach().to("cpu", torch.float64),
            losses.detach().to("cpu", torch.float64),
            n_tok.to("cpu", torch.int64),
        )
    finally:
        for h in handles:
            h.remove()
        captured.clear()
