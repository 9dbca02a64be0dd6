"""Building the target model for DeepSpeed and saving it back as a plain `save_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from gradfilter_ray.config import FinetuneConfig
from gradfilter_ray.lora import DEFAULT_TARGETS
from gradfilter_ray.models import instantiate, model_family, skeleton


def _lora_config(finetune: FinetuneConfig, model_type: str):
    from peft import LoraConfig

    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA target modules for {model_type!r} (known: {sorted(DEFAULT_TARGETS)})")
    return LoraConfig(
        r=finetune.lora_rank,
        lora_alpha=finetune.lora_alpha,
        lora_dropout=0.05,
        target_modules=DEFAULT_TARGETS[model_type],
        task_type="CAUSAL_LM",
    )


def build_trainable(finetune: FinetuneConfig, dtype: torch.dtype, ds_config: dict):
    """The model to hand to deepspeed.initialize: every weight trainable (full) or a LoRA adapter (lora)."""
    keep_alive = None
    if finetune.zero_stage == 3 and finetune.model.build_from_config is None:
        # With this object alive, from_pretrained builds the model already partitioned (deepspeed.zero.Init), so
        # no worker ever holds a whole 7B/13B model.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model = instantiate(finetune.model, dtype)
    del keep_alive
    if finetune.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if finetune.method == "lora":
        from peft import get_peft_model

        torch.manual_seed(finetune.seed)
        model = get_peft_model(model, _lora_config(finetune, model_family(model)))
        if finetune.gradient_checkpointing:
            model.enable_input_require_grads()
    else:
        model.requires_grad_(True)
    return model


def save_merged(finetune: FinetuneConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, out: Path) -> None:
    """Write a `save_pretrained` folder (safetensors) that AutoModelForCausalLM.from_pretrained loads, from the
    consolidated trained state dict: a fresh CPU copy of the model takes the weights (LoRA merged in), so this
    works the same whether ZeRO partitioned the training copy or not. Full fine-tuning trains every weight, so
    the copy is a skeleton on the meta device that takes the trained tensors as they are (no pretrained weights
    read again); LoRA keeps the frozen base, so its copy is loaded."""
    if finetune.method == "lora":
        from peft import get_peft_model

        model = instantiate(finetune.model, dtype)
        model = get_peft_model(model, _lora_config(finetune, model_family(model)))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    else:
        model = skeleton(finetune.model, dtype)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        model.tie_weights()
        # Non-persistent buffers (rotary tables) stay on meta: they are not saved, and from_pretrained rebuilds them.
        left = [name for name, t in model.state_dict().items() if t.is_meta]
        if left:
            raise RuntimeError(f"trained state leaves weights unset: {left[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied: it is the embedding matrix
    if missing or unexpected:
        raise RuntimeError(f"trained state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if finetune.method == "lora":
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out)
