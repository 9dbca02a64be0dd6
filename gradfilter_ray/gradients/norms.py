"""Exact per-example squared gradient norms over a LoRA adapter, from one batched forward and one backward.

For a Linear y = x W^T (+ b) applied at every token, example i's weight gradient is G_i = sum_t g_{i,t}^T x_{i,t}
(g = dL/dy). A forward hook on every lora_A / lora_B Linear keeps its input x and puts a tensor hook on its output;
when backward reaches that output, the hook turns g into each example's ||G_i||^2 (one bmm) and lets g go. So at
most one module's g is alive at a time and no LoRA weight gradient is formed: the LoRA weights are frozen for the
call and backward runs to the input embeddings' output instead (what HF's enable_input_require_grads does).

The loss is `head_loss.response_losses`: each row's own labelled positions through the LM head in chunks, never the
[B, T, vocab] logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from torch import Tensor, nn

from gradfilter_ray.gradients.head_loss import head_path, response_losses
from gradfilter_ray.lora import lora_layers, resolve_adapter
from gradfilter_ray.losses import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "per_example_sq_norms"]


def _activate(model: nn.Module, names: list[str]) -> None:
    # PeftModel.set_adapter keeps PeftModel.active_adapter in sync but takes one name; LoraModel takes a list.
    if isinstance(model, PeftModel) and len(names) == 1:
        model.set_adapter(names[0])
    else:
        (model.base_model if isinstance(model, PeftModel) else model).set_adapter(names)


@contextlib.contextmanager
def _scoring_state(model: nn.Module, adapter_name: str, params: list[nn.Parameter], trainable: bool) -> Iterator[None]:
    """eval() everywhere, adapter active, its params' requires_grad = `trainable`; all of it restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    prev_active = list(model.active_adapters)
    try:
        model.eval()  # dropout off: the reference gradient is that of the deterministic eval-mode loss
        if prev_active != [adapter_name]:
            _activate(model, [adapter_name])  # also rewrites requires_grad flags; restored below
        for p in params:
            p.requires_grad_(trainable)
        yield
    finally:
        if list(model.active_adapters) != prev_active:
            _activate(model, prev_active)
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.training = tr


def input_dtypes(layers: list, name: str) -> dict[nn.Linear, torch.dtype]:
    """lora_A -> the dtype to hold its input in: the base layer's. peft runs adapters in fp32 on a bf16 model and
    casts the layer's (bf16) input up before lora_A; holding that fp32 copy until backward doubled the biggest
    saved tensor of the kernel. Casting it back is exact (it was a bf16 value), and the reduction upcasts anyway."""
    narrow = {}
    for _, layer in layers:
        base = layer.get_base_layer().weight.dtype
        if base.is_floating_point and torch.finfo(base).bits < torch.finfo(layer.lora_A[name].weight.dtype).bits:
            narrow[layer.lora_A[name]] = base
    return narrow


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        emb = lm.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return emb if isinstance(emb, nn.Module) else None


class _PerExampleReducer:
    """Forward hooks on the LoRA Linears; their outputs' tensor hooks reduce g into per-example squared norms.

    A module called once adds its ||G_i||^2 as soon as its g arrives. A module called several times per forward
    (weight sharing) has one G_i over all its calls, so its per-call G_i are summed first and squared at the end;
    by the time backward runs the forward is over, so the call count is final.
    """

    def __init__(
        self, lins: list[nn.Linear], keep: Tensor, acc: torch.dtype, narrow: dict[nn.Linear, torch.dtype] | None = None
    ) -> None:
        self.keep = keep  # [B, T, 1] bool: real (not padding) positions
        self.acc = acc
        self.narrow = narrow or {}  # module -> the dtype its input is held in until backward (see input_dtypes)
        self.calls = {lin: 0 for lin in lins}
        self.inputs: dict[tuple[nn.Linear, int], Tensor] = {}
        self.sq = torch.zeros(keep.shape[0], dtype=acc, device=keep.device)
        self.shared: dict[nn.Linear, list[Tensor | None]] = {}  # module -> [sum of G_i, sum of per-call g sums]
        self.ungraphed = 0  # LoRA outputs that backward cannot reach

    def forward_hook(self, mod: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        key = (mod, self.calls[mod])
        self.calls[mod] += 1
        if not out.requires_grad:
            self.ungraphed += 1
            return
        x = inputs[0]
        held = self.narrow.get(mod)
        if held is not None and x.dtype != held:
            x = x.to(held)
        self.inputs[key] = x
        out.register_hook(lambda g, key=key: self._reduce(key, g))

    def _reduce(self, key: tuple[nn.Linear, int], g: Tensor) -> None:
        mod = key[0]
        x = self.inputs.pop(key)  # drop our reference: this call's x is not needed again
        with torch.no_grad():
            batch = self.keep.shape[0]
            x, g = x.reshape(batch, -1, x.shape[-1]).to(self.acc), g.reshape(batch, -1, g.shape[-1]).to(self.acc)
            if x.shape[1] == self.keep.shape[1]:
                # g is exactly 0 on padding; masking also keeps non-finite padded activations out of bmm.
                x, g = x.masked_fill(~self.keep, 0), g.masked_fill(~self.keep, 0)
            G = torch.bmm(g.transpose(1, 2), x)
            g_sum = g.sum(dim=1) if mod.bias is not None else None
            if self.calls[mod] == 1:
                self.sq += self._square(G, g_sum)
                return
            acc = self.shared.setdefault(mod, [None, None])
            acc[0] = G if acc[0] is None else acc[0] + G
            if g_sum is not None:
                acc[1] = g_sum if acc[1] is None else acc[1] + g_sum

    @staticmethod
    def _square(G: Tensor, g_sum: Tensor | None) -> Tensor:
        sq = G.pow(2).sum(dim=(1, 2))
        return sq if g_sum is None else sq + g_sum.pow(2).sum(dim=1)

    def result(self) -> Tensor:
        """[B] per-example ||grad||^2 once backward is over (modules whose g never came contribute 0)."""
        self.inputs.clear()
        for G, g_sum in self.shared.values():
            self.sq += self._square(G, g_sum)
        self.shared.clear()
        return self.sq


def per_example_sq_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    adapter_name: str | None = None,
    loss_chunk_tokens: int = 2048,
    head_dtype: torch.dtype | None = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-example ||d loss_i / d theta||^2 over all LoRA A/B params of one adapter.

    input_ids, attention_mask, labels: [B, T] long, right-padded; labels are -100 outside the response and are
    unshifted (HF convention). loss_i is the mean token cross-entropy over example i's predicted response tokens
    (labels[i, 1:] != -100), computed in eval mode. Returns CPU tensors (sq_norms [B] float64, losses [B] float64,
    n_response_tokens [B] int64); a row without response tokens yields (0, 0, 0). At most `loss_chunk_tokens`
    positions of vocabulary-wide logits exist at any time (unless `head_loss` had to fall back, see there); they are
    computed in `head_dtype` (None: the model's dtype).
    """
    name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, name)
    lins = [lin for _, m in layers for lin in (m.lora_A[name], m.lora_B[name])]
    params = [p for lin in lins for p in lin.parameters()]
    B = input_ids.shape[0]
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        zeros = torch.zeros(B, dtype=torch.float64)
        return zeros, zeros.clone(), torch.zeros(B, dtype=torch.int64)
    acc = torch.promote_types(params[0].dtype, torch.float32)
    embeddings = _input_embeddings(model)
    reducer = _PerExampleReducer(
        lins, attention_mask.to(params[0].device).bool()[:, :, None], acc, input_dtypes(layers, name)
    )
    roots: list[Tensor] = []

    def root_hook(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        if not out.requires_grad:
            out.requires_grad_(True)  # a leaf: the frozen embedding's output
        roots.append(out)
        return out

    handles = []
    # With the embeddings' output as backward's target, the LoRA weights need no gradient; a model without
    # get_input_embeddings() differentiates w.r.t. the LoRA weights instead (their batch gradient is formed, unused).
    trainable = embeddings is None
    try:
        with _scoring_state(model, name, params, trainable), torch.inference_mode(False), torch.enable_grad():
            head_path(model)  # its one-time probe runs the model: before the hooks go on
            handles = [lin.register_forward_hook(reducer.forward_hook) for lin in lins]
            if embeddings is not None:
                handles.append(embeddings.register_forward_hook(root_hook))
            losses, n_tok = response_losses(model, input_ids, attention_mask, labels, loss_chunk_tokens, head_dtype)
            for h in handles:
                h.remove()
            handles = []
            missing = [lin for lin, calls in reducer.calls.items() if not calls]
            if missing:
                raise RuntimeError(f"{len(missing)} LoRA modules of {name!r} were not called (adapters disabled?)")
            if reducer.ungraphed:
                raise RuntimeError(
                    f"{reducer.ungraphed} LoRA outputs of {name!r} do not depend on the input embeddings' output, so "
                    "backward to it cannot reach them"
                )
            targets = params if trainable else roots
            torch.autograd.grad(losses.sum(), targets, allow_unused=True)
            sq = reducer.result()
        return (
            sq.detach().to("cpu", torch.float64),
            losses.detach().to("cpu", torch.float64),
            n_tok.to("cpu", torch.int64),
        )
    finally:
        for h in handles:
            h.remove()
        reducer.inputs.clear()
        roots.clear()
