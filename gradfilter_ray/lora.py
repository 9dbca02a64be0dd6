"""LoRA adapters on a frozen proxy, shared by the ensemble (which trains them) and the extraction (which measures
them): per-architecture targets, seeded initialisation, save/load as safetensors, and which modules an adapter
covers. Pure torch/peft: no Ray, no stage imports (`ensemble/` and `gradients/` both import this, never each other).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradfilter_ray.config import EnsembleConfig

# peft matches module-name suffixes: on GPT-2 "c_proj" also matches mlp.c_proj (both the attention output and the
# MLP down-projection are adapted), which is what the paper's GPT-2 setting does.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def target_modules(cfg: EnsembleConfig, model_type: str) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model type {model_type!r}: set ensemble.target_modules "
            f"(defaults exist for {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def lora_config(cfg: EnsembleConfig, model_type: str, dropout: float | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout if dropout is None else dropout,
        target_modules=target_modules(cfg, model_type),
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )


def attach_lora(base, cfg: EnsembleConfig, seed: int, adapter_name: str = "default"):
    """Wrap the frozen base with a fresh LoRA adapter whose random A matrices come from `seed`."""
    from peft import get_peft_model

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = get_peft_model(base, lora_config(cfg, base.config.model_type), adapter_name=adapter_name)
    finally:
        torch.random.set_rng_state(state)
    return model


def save_adapter(model, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)


def load_adapters(base, folders: dict[str, Path]):
    """One PeftModel over `base` holding every named adapter (dropout off: these are for measurement)."""
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name, is_trainable=False)
    model.eval()
    return model


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """`adapter_name`, or the model's one active adapter when None."""
    if adapter_name is not None:
        return adapter_name
    active = list(model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"expected exactly one active adapter, got {active}; pass adapter_name")
    return active[0]


def lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(name, LoraLayer) of every module carrying the adapter; refuses what the exact-norm kernel cannot cover."""
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"no LoRA layer carries adapter {adapter_name!r}")
    for name, m in layers:
        # Variants (DoRA, aLoRA, ...) and embedding LoRA add parameters / paths the Linear contraction does not cover.
        if adapter_name in getattr(m, "lora_variant", {}):
            raise NotImplementedError(f"{name}: LoRA variants (e.g. DoRA) are not supported")
        if adapter_name in getattr(m, "lora_embedding_A", {}):
            raise NotImplementedError(f"{name}: embedding LoRA is not supported")
        if getattr(m, "merged", False):
            raise RuntimeError(f"{name}: adapter is merged into the base weights; unmerge first")
        if not isinstance(m.lora_A[adapter_name], nn.Linear) or not isinstance(m.lora_B[adapter_name], nn.Linear):
            raise NotImplementedError(f"{name}: only Linear lora_A / lora_B modules are supported")
    return layers


def adapted_module_names(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Names (as in model.named_modules()) of the modules carrying the adapter."""
    return [n for n, _ in lora_layers(model, resolve_adapter(model, adapter_name))]


def lora_parameter_count(model: nn.Module, adapter_name: str | None = None) -> int:
    """Number of scalar LoRA A/B parameters (incl. lora_B bias if any) of the adapter: the dimension of theta."""
    name = resolve_adapter(model, adapter_name)
    return sum(
        p.numel()
        for _, m in lora_layers(model, name)
        for lin in (m.lora_A[name], m.lora_B[name])
        for p in lin.parameters()
    )
