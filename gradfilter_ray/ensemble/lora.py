"""LoRA adapters on a frozen proxy: per-architecture defaults, seeded initialisation, save/load as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

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
