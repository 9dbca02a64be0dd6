"""Answer generation through vLLM: Ray Data's LLM processor (`ray.data.llm.vLLMEngineProcessorConfig` +
`build_processor`, Ray 2.60), one engine per actor, the actors as wide as the run's share of the GPUs.

The engine is given token ids, not text: the driver builds them with the same `prompt_token_ids` the HF path uses
(Alpaca prompt, BOS when the tokenizer has a distinct one, left-truncated to `max_prompt_tokens`), and decodes the
generated ids with the same `decode_answers`, so both engines see identical input and their answers are decoded
alike. Ray's own chat-template, tokenize and detokenize stages are therefore off, and vLLM skips detokenisation.
Greedy decoding is temperature 0 with the same max new tokens; sampled decoding seeds every request with 0, which
makes it reproducible under vLLM but not equal to the HF path's samples (another RNG).

Everything but `processor` and `generation_dataset` is pure (no Ray, no vLLM) and unit tested; `processor` is
built in a test too (without vLLM). vllm and ray.data.llm are imported lazily, so nothing breaks where vLLM is
absent. The vLLM run itself is untested until a GPU run exercises it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from gradfilter_ray.evaluation.generate import Sampling
from gradfilter_ray.evaluation.hf_engine import POSITION

SEED = 0
CONCURRENT_BATCHES = 8  # Ray's default: batch_size 16 keeps 128 sequences in each engine


def vllm_installed() -> bool:
    """Whether vllm can be imported here (looked up, not imported: importing it is slow and starts CUDA work)."""
    return importlib.util.find_spec("vllm") is not None


def sampling_params(sampling: Sampling) -> dict[str, Any]:
    """vLLM SamplingParams for `sampling`: greedy is temperature 0; the engine returns ids only (we decode)."""
    params: dict[str, Any] = {"max_tokens": sampling.max_new_tokens, "detokenize": False}
    if sampling.do_sample:
        params.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=SEED)
    else:
        params.update(temperature=0.0)
    return params


def tensor_parallel_size(gpus_per_actor: float) -> int:
    """1 for a GPU or a share of one; n for n whole GPUs (one engine sharded over them)."""
    return int(gpus_per_actor) if gpus_per_actor > 1 else 1


def max_model_len(max_prompt_tokens: int, max_new_tokens: int, model_max_len: int | None) -> int:
    """Room for the longest prompt plus the answer (a smaller KV cache than the model's whole context), never past
    the model's own limit."""
    needed = max_prompt_tokens + max_new_tokens
    return min(needed, model_max_len) if model_max_len else needed


def processor_config(
    model_path: str,
    *,
    actors: int,
    batch_size: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    sampling: Sampling,
    model_max_len: int | None = None,
    extra_engine_kwargs: dict | None = None,
    allocator_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vLLMEngineProcessorConfig` for one run's model on `actors` engines. `allocator_env` is
    the CUDA allocator setting the job gives its workers (`runtime.allocator_env`)."""
    tp = tensor_parallel_size(gpus_per_actor)
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": tp,
        "max_model_len": max_model_len(sampling.max_prompt_tokens, sampling.max_new_tokens, model_max_len),
        "dtype": "bfloat16",  # what the HF path loads on a GPU
        "enable_prefix_caching": True,  # every prompt starts with the same Alpaca preamble
        "seed": SEED,
    }
    if gpus_per_actor < 1:  # actors share a GPU: each engine takes its share of the memory, not vLLM's 90 %
        engine_kwargs["gpu_memory_utilization"] = round(0.9 * gpus_per_actor, 4)
    engine_kwargs.update(extra_engine_kwargs or {})
    config: dict[str, Any] = {
        "model_source": model_path,
        "batch_size": batch_size,
        "concurrency": (actors, actors),  # a fixed pool: this run's share of the GPUs, no more, no less
        # Batches in the engine at once (continuous batching), and no more queued on an engine than that: the first
        # engine ready would otherwise take batches the later ones could already be answering.
        "max_concurrent_batches": CONCURRENT_BATCHES,
        "max_tasks_in_flight_per_actor": CONCURRENT_BATCHES,
        "engine_kwargs": engine_kwargs,
        "chat_template_stage": False,  # the Alpaca prompt is built by us, not a chat template
        "tokenize_stage": False,  # rows carry token ids already
        "detokenize_stage": False,  # we decode, as the HF path does
        "log_engine_metrics": False,  # needs a metrics export port we do not open
    }
    if tp == 1:  # one engine process: reserve exactly the configured CPUs and GPU (share) for it
        config["placement_group_config"] = {"bundles": [{"CPU": cpus_per_actor, "GPU": gpus_per_actor}]}
    elif allocator_env:
        # vLLM's custom all-reduce shares its CUDA-graph buffers between tensor-parallel ranks through
        # cudaIpcGetMemHandle, which refuses expandable segments' memory: such an engine dies at start-up (reported
        # upstream for several vLLM versions). A setting the user chose is not ours to change.
        config["runtime_env"] = {"env_vars": {name: "expandable_segments:False" for name in allocator_env}}
    return config


def request_rows(token_ids: list[list[int]], sampling: Sampling) -> list[dict[str, Any]]:
    """The processor's input rows: each prompt's ids, its sampling parameters and its position."""
    params = sampling_params(sampling)
    return [{POSITION: i, "tokenized_prompt": ids, "sampling_params": params} for i, ids in enumerate(token_ids)]


def generated_ids(row: dict[str, Any]) -> dict[str, Any]:
    """Postprocess: keep the position and the generated ids, drop the rest of the engine's output."""
    return {POSITION: int(row[POSITION]), "generated_tokens": [int(t) for t in row["generated_tokens"]]}


def in_order(rows: list[dict[str, Any]], n: int) -> list[list[int]]:
    """The generated ids of positions 0..n-1; raises if any is missing or repeated."""
    found: dict[int, list[int]] = {}
    for row in rows:
        if int(row[POSITION]) in found:
            raise RuntimeError(f"vLLM answered position {row[POSITION]} twice")
        found[int(row[POSITION])] = list(row["generated_tokens"])
    if sorted(found) != list(range(n)):
        raise RuntimeError(f"vLLM answered {len(found)} of {n} prompts")
    return [found[i] for i in range(n)]


def processor(config: dict[str, Any]):
    """Ray shell: Ray Data's vLLM processor for `config` (processor_config's dict), keeping only our columns."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    return build_processor(vLLMEngineProcessorConfig(**config), postprocess=generated_ids)


def generation_dataset(config: dict[str, Any], token_ids: list[list[int]], sampling: Sampling):
    """Ray shell: the prompts streamed through the run's vLLM processor, one batch per input block so that every
    engine of the pool gets a share."""
    import ray.data

    blocks = max(1, -(-len(token_ids) // config["batch_size"]))
    return processor(config)(ray.data.from_items(request_rows(token_ids, sampling), override_num_blocks=blocks))
