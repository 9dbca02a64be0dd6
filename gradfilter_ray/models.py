"""Loading causal LMs and tokenizers: hub names, local folders, the bundled tiny models, or a config to build.

Nothing here downloads unless the user names a hub model; `bundled:NAME` resolves to the assets shipped inside the
package (see gradfilter_ray/assets/README.md), so the demo and the tests run offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradfilter_ray.bundled import resolve
from gradfilter_ray.config import ModelSpec, Precision, resolved_dtype


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    source = resolve(spec.tokenizer or spec.name_or_path or "")
    folder = Path(source)
    if folder.is_dir() and (folder / "vocab.json").exists() and not (folder / "tokenizer.json").exists():
        tokenizer = GPT2TokenizerFast.from_pretrained(
            source
        )  # bare GPT-2 BPE files: no tokenizer_config to dispatch on
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
    if tokenizer.pad_token_id is None:
        # Padding is always masked (attention mask and -100 labels), so any id will do; EOS is conventional.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    return getattr(torch, resolved_dtype(precision, device.type == "cuda"))


def instantiate(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The model a spec names, built in `dtype` on CPU (or partitioned, when a DeepSpeed ZeRO-3 config is alive).

    A model built from a config takes its initial weights from `spec.init_seed` alone; the caller's global RNG is
    left as it was, so building a model never shifts the data order or dropout of what runs next."""
    from transformers import AutoModelForCausalLM

    if spec.build_from_config is not None:
        config = model_config(spec)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(spec.init_seed)
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        finally:
            torch.random.set_rng_state(generator_state)
    return AutoModelForCausalLM.from_pretrained(
        resolve(spec.name_or_path or ""),
        config=model_config(spec),
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
        dtype=dtype,
    )


def model_config(spec: ModelSpec):
    """The transformers config of the model a spec names (no weights read), with its activation in one kernel."""
    from transformers import AutoConfig

    if spec.build_from_config is not None:
        params = dict(spec.build_from_config)
        config = AutoConfig.for_model(params.pop("model_type"), **params)
    else:
        config = AutoConfig.from_pretrained(
            resolve(spec.name_or_path or ""), trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
    # Remote modelling code may keep its own activation table: its names are left as they are.
    return config if spec.trust_remote_code else one_kernel_activation(config)


# The same function as one fused kernel: GPT-2's `gelu_new` is tanh-GELU written as a Python formula (several kernels
# and saved tensors per MLP); `gelu_pytorch_tanh` computes it in one (equal to float rounding; tests/test_models.py).
ONE_KERNEL_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def one_kernel_activation(config):
    """`config` with each activation that has a one-kernel equivalent renamed to it (GPT-2 names its activation
    `activation_function`, most other families `hidden_act`)."""
    for attr in ("activation_function", "hidden_act"):
        name = getattr(config, attr, None)
        if isinstance(name, str) and name in ONE_KERNEL_ACTIVATIONS:
            setattr(config, attr, ONE_KERNEL_ACTIVATIONS[name])
    return config


def skeleton(spec: ModelSpec, dtype: torch.dtype):
    """The model's modules with no storage behind their weights (the meta device): for a caller that is about to
    assign every weight itself, so 7B/13B pretrained weights are not read (nor 28-52 GB allocated) a second time."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config(spec), dtype=dtype, trust_remote_code=spec.trust_remote_code
        )
    shipped = shipped_generation_config(spec)
    if shipped is not None:  # from_config derives one from the model config: the model's own stop tokens are lost
        model.generation_config = shipped
    return model


def shipped_generation_config(spec: ModelSpec):
    """The generation defaults a pretrained model ships with (`generation_config.json`: stop tokens, sampling
    settings), or None for a model built from a config or shipped without one."""
    from transformers import GenerationConfig

    if spec.build_from_config is not None:
        return None
    try:
        return GenerationConfig.from_pretrained(resolve(spec.name_or_path or ""), revision=spec.revision)
    except OSError:
        return None


def load_causal_lm(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A causal LM in eval mode with its weights frozen (callers add adapters or unfreeze as they need)."""
    # Built in float32 and cast after: the same initial weights whatever precision a stage computes in.
    model = instantiate(spec, torch.float32).to(device=device, dtype=dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def model_family(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "unknown")


def pick_device(gpus_assigned: float | int | None = None) -> torch.device:
    """CUDA when this process was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    if torch.cuda.is_available() and (gpus_assigned is None or gpus_assigned > 0):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
