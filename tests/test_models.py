"""Model loading offline: bundled pretrained tiny LLaMA, tiny GPT-2 built from a config with the real tokenizer."""

import pytest
import torch

from gradfilter_ray.bundled import resolve
from gradfilter_ray.config import ModelSpec
from gradfilter_ray.models import instantiate, load_causal_lm, load_tokenizer, model_family, resolve_dtype

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}


def test_bundled_stories260k_is_a_real_pretrained_llama():
    spec = ModelSpec(name_or_path="bundled:stories260K")
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    assert model_family(model) == "llama" and tok.vocab_size == 512
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ids = tok("Once upon a time, there was a little girl", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.0  # pretrained on TinyStories: far below a uniform guess, log(512) = 6.2


def test_tiny_gpt2_from_config_is_deterministic_and_uses_the_real_tokenizer():
    spec = ModelSpec(build_from_config=TINY_GPT2, tokenizer="bundled:gpt2", init_seed=3)
    a, b = load_causal_lm(spec), load_causal_lm(spec)
    c = load_causal_lm(ModelSpec(build_from_config=TINY_GPT2, tokenizer="bundled:gpt2", init_seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)
    tok = load_tokenizer(spec)
    assert tok("hello world")["input_ids"] == [31373, 995] and tok.pad_token_id == tok.eos_token_id == 50256
    assert a.config.vocab_size == 50257


def test_dtype_and_bundled_names():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float64", torch.device("cpu")) == torch.float64
    with pytest.raises(ValueError, match="unknown bundled asset"):
        resolve("bundled:gpt5")
    assert resolve("gpt2") == "gpt2"


def test_building_a_model_leaves_the_callers_random_stream_alone():
    spec = ModelSpec(build_from_config=TINY_GPT2, tokenizer="bundled:gpt2", init_seed=3)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    trainable = instantiate(spec)  # as the fine-tuning stage builds it: trainable, nothing frozen
    assert torch.equal(torch.rand(4), expected)
    assert all(p.requires_grad for p in trainable.parameters())
    frozen = load_causal_lm(spec)
    assert all(torch.equal(x, y) for x, y in zip(trainable.state_dict().values(), frozen.state_dict().values()))


@pytest.mark.parametrize("source", ["config", "folder"])
def test_gpt2_gelu_new_runs_as_the_one_kernel_tanh_gelu_with_the_same_outputs(tmp_path, source):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    config = AutoConfig.for_model(**TINY_GPT2)
    assert config.activation_function == "gelu_new"  # GPT-2's own, as a Python formula
    torch.manual_seed(0)
    formula = AutoModelForCausalLM.from_config(config).double().eval()  # float32 weights: loading them is exact
    if source == "folder":  # a pretrained checkpoint naming gelu_new in its config.json
        formula.save_pretrained(tmp_path)
        spec = ModelSpec(name_or_path=str(tmp_path), tokenizer="bundled:gpt2")
    else:
        spec = ModelSpec(build_from_config=TINY_GPT2, tokenizer="bundled:gpt2")
    fused = load_causal_lm(spec, torch.float64)
    if source == "config":
        fused.load_state_dict(formula.state_dict())
    assert isinstance(formula.transformer.h[0].mlp.act, NewGELUActivation)
    assert isinstance(fused.transformer.h[0].mlp.act, GELUTanh) and fused.config.activation_function != "gelu_new"
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = formula(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # the same function, to float64 rounding
    x = torch.linspace(-8, 8, 10_001)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), rtol=2e-6, atol=2e-7)  # and in float32


def test_remote_modelling_code_keeps_its_own_activation_names(tmp_path):
    from transformers import AutoConfig

    from gradfilter_ray.models import model_config

    AutoConfig.for_model(**TINY_GPT2).save_pretrained(tmp_path)
    trusted = ModelSpec(name_or_path=str(tmp_path), tokenizer="bundled:gpt2", trust_remote_code=True)
    assert model_config(trusted).activation_function == "gelu_new"  # its own table may not know the fused name
    assert model_config(ModelSpec(name_or_path=str(tmp_path))).activation_function == "gelu_pytorch_tanh"
