"""Typed configuration: one frozen dataclass per YAML section.

Every field carries a one-line docstring-style comment (``doc`` metadata), which `gradfilter-ray config-reference`
turns into docs/configuration.md.
`load(path, overrides)` reads YAML, applies ``--set a.b=v`` overrides (values parsed as YAML) and builds the
dataclasses recursively; an unknown key, a wrong type or a failed cross-field check raises `ConfigError` naming
the dotted path, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gradfilter_ray.audit.plant import KINDS
from gradfilter_ray.scoring.scorers import SCORERS
from gradfilter_ray.storage import StorageError, check_uri


class ConfigError(ValueError):
    """A configuration problem, always naming the dotted path of the offending field."""


# What a field does to a run's outputs, declared beside its doc text (`doc(..., keys=...)`): the stage and unit keys
# hash exactly the fields that change what is computed, so a change re-runs the work it affects and nothing else.
OUTPUT = "output"  # changes what is computed: part of every key of the work that reads it
RUN = "run"  # how wide, where, how often retried, how long waited for, how logged or checkpointed: never a key
WHEN_SET = "when_set"  # an opt-in: keyed only away from its default (at it, it computes what configs without it did)
RESOLVED = "resolved"  # keyed through the value it resolves to (`resolved_values`), not through the setting
KEY_CLASSES = (OUTPUT, RUN, WHEN_SET, RESOLVED)


def doc(
    text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, keys: str | None = None
) -> Any:
    """A documented field; `keys` (one of KEY_CLASSES) says how it keys outputs. A section (a dataclass-typed
    field) leaves it out: its own fields say."""
    if keys is not None and keys not in KEY_CLASSES:
        raise ValueError(f"keys must be one of {KEY_CLASSES}, got {keys!r}")
    metadata = {"doc": text, "keys": keys}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DataFormat = Literal["auto", "alpaca_json", "jsonl", "parquet", "sharegpt"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "float32", "bfloat16", "float64"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a causal LM comes from: a hub name / local folder, or a config to build a random-init model."""

    name_or_path: str | None = doc(
        "Hugging Face hub name or local folder; 'bundled:stories260K' is the tiny pretrained LLaMA in the package.",
        None,
        keys=OUTPUT,
    )
    tokenizer: str | None = doc(
        "Tokenizer hub name or folder when it differs from the model; 'bundled:gpt2' is the real GPT-2 BPE.",
        None,
        keys=OUTPUT,
    )
    build_from_config: dict[str, Any] | None = doc(
        "Build a randomly initialised model from this transformers config dict (e.g. a tiny GPT-2) instead of "
        "loading weights; used by tests and benchmarks.",
        None,
        keys=OUTPUT,
    )
    init_seed: int = doc(
        "Seed for build_from_config's random initialisation (same seed -> same weights).", 0, keys=OUTPUT
    )
    trust_remote_code: bool = doc(
        "Allow model code from the hub repo to run. Off unless you trust the repo.", False, keys=RUN
    )
    revision: str | None = doc("Hub revision (branch, tag or commit) to pin.", None, keys=OUTPUT)

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.build_from_config is None):
            raise ConfigError("exactly one of name_or_path and build_from_config must be set")
        if self.build_from_config is not None and self.tokenizer is None:
            raise ConfigError("build_from_config needs a tokenizer")


@dataclass(frozen=True)
class DataConfig:
    path: str = doc(
        "Input: a file, a glob, a directory or a pyarrow filesystem URI (s3://, gs://, file://).", "", keys=OUTPUT
    )
    format: DataFormat = doc(
        "Input format; 'auto' picks by extension (.json list, .jsonl, .parquet).", "auto", keys=OUTPUT
    )
    dedup: bool = doc(
        "Reject exact duplicates (same instruction, input and output; for a multi-turn conversation the same turns), "
        "keeping the lowest id.",
        True,
        keys=OUTPUT,
    )
    max_field_chars: int = doc(
        "Reject rows with any text field longer than this many characters.", 200_000, keys=OUTPUT
    )
    limit: int | None = doc(
        "Read only the first N rows of every file (quick looks); None reads everything.", None, keys=OUTPUT
    )

    def __post_init__(self) -> None:
        if self.max_field_chars <= 0:
            raise ConfigError("max_field_chars must be positive")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError("limit must be positive or null")


@dataclass(frozen=True)
class ProxyConfig:
    model: ModelSpec = doc(
        "The small frozen proxy LM (GPT-2 family in the paper).",
        default_factory=lambda: ModelSpec(name_or_path="gpt2"),
    )
    max_length: int = doc("Max tokens per example (prompt + response); the response is cut first.", 512, keys=OUTPUT)
    template: Literal["alpaca", "chat"] = doc(
        "Prompt format: alpaca (the Stanford Alpaca prompt; a multi-turn conversation has no Alpaca form and is "
        "counted, untrained) or chat (the tokenizer's chat template, or chat_template; the loss on every answer "
        "turn).",
        "alpaca",
        keys=OUTPUT,
    )
    chat_template: str | None = doc(
        "Jinja chat template for template: chat when the tokenizer has none (GPT-2); None = the tokenizer's own.",
        None,
        keys=OUTPUT,
    )
    train_tool_calls: bool = doc(
        "With template: chat, also train on tool-call turns (as on assistant answers).", True, keys=OUTPUT
    )
    add_bos: bool | None = doc(
        "Prepend BOS; None = the tokenizer family's convention (Llama yes, GPT-2 no).", None, keys=OUTPUT
    )
    add_eos: bool = doc("Append EOS after the response so the model learns to stop.", True, keys=OUTPUT)

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError("max_length must be at least 8")


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = doc("Number of LoRA ensemble members M.", 5, keys=OUTPUT)
    epochs: int = doc("Training epochs per member.", 2, keys=OUTPUT)
    early_epoch: int = doc("Epoch whose adapter counts as 'early' for G-SNR.", 1, keys=OUTPUT)
    late_epoch: int = doc("Epoch whose adapter counts as 'late' for G-SNR.", 2, keys=OUTPUT)
    seed: int = doc("Base seed; member m uses seed + m for its LoRA init and its data order.", 42, keys=OUTPUT)
    lora_rank: int = doc("LoRA rank r.", 8, keys=OUTPUT)
    lora_alpha: float = doc("LoRA alpha (scaling = alpha / r).", 16.0, keys=OUTPUT)
    lora_dropout: float = doc(
        "LoRA dropout while training (gradient extraction always runs with dropout off).", 0.05, keys=OUTPUT
    )
    target_modules: list[str] | None = doc(
        "Module names to adapt; None = the architecture's default (GPT-2: c_attn, c_proj; LLaMA: q/k/v/o_proj).",
        None,
        keys=OUTPUT,
    )
    learning_rate: float = doc("AdamW learning rate.", 2e-4, keys=OUTPUT)
    weight_decay: float = doc("AdamW weight decay.", 0.0, keys=OUTPUT)
    batch_size: int = doc("Examples per optimiser step.", 8, keys=OUTPUT)
    cpus_per_member: float = doc(
        "CPUs reserved per member worker (fractions let several share a core).", 1.0, keys=RUN
    )
    gpus_per_member: float = doc(
        "GPUs per member worker (fractions let several small members share one GPU).", 0.0, keys=RUN
    )
    precision: Precision = doc("Training dtype; 'auto' = bf16 autocast on CUDA, fp32 on CPU.", "auto", keys=RESOLVED)
    batching: Literal["random", "length_grouped"] = doc(
        "How an epoch's rows form batches: 'random' (uniformly shuffled batches, as the paper trains) or "
        "'length_grouped' (rows of similar length share a batch: less padding compute, but it changes which rows "
        "share a batch and so which rows G-SNR selects; on the planted-noise audit it selects worse, see "
        "docs/quality.md). Opt-in only.",
        "random",
        keys=OUTPUT,
    )
    length_group_batches: int = doc(
        "length_grouped: rows are sorted by length within shuffled windows of this many batches (larger = less "
        "padding, less randomness in who shares a batch).",
        64,
        keys=OUTPUT,
    )
    packing: bool = doc(
        "Pack each batch's rows padding-free (bin-packed into a few sequences no longer than its longest row, each "
        "row with its own positions and a block-diagonal causal mask) instead of padding every row to the longest. "
        "The same rows per batch as the padded batch, so the same losses and gradients up to float rounding with "
        "dropout off; with lora_dropout > 0 the dropout masks differ (so selections can differ slightly). Needs "
        "sdpa or eager attention (a 4D attention mask). Opt-in.",
        False,
        keys=WHEN_SET,
    )
    max_failures: int = doc(
        "Ray Train restarts of a failed worker group (resumes from the last checkpoint).", 1, keys=RUN
    )

    def __post_init__(self) -> None:
        if self.length_group_batches < 1:
            raise ConfigError("length_group_batches must be >= 1")
        if self.members < 1:
            raise ConfigError("members must be >= 1")
        if self.epochs < 1:
            raise ConfigError("epochs must be >= 1")
        if not 1 <= self.early_epoch < self.late_epoch <= self.epochs:
            raise ConfigError("need 1 <= early_epoch < late_epoch <= epochs")
        if self.lora_rank < 1 or self.batch_size < 1:
            raise ConfigError("lora_rank and batch_size must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_dropout must be in [0, 1)")
        if self.cpus_per_member <= 0 or self.gpus_per_member < 0:
            raise ConfigError("cpus_per_member must be > 0 and gpus_per_member >= 0")


@dataclass(frozen=True)
class GradientsConfig:
    tokens_per_batch: int = doc(
        "Token budget of one extraction batch (rows x padded length): what bounds an actor's memory. Rows sorted by "
        "length fill batches up to it; an out-of-memory batch is split in halves and retried.",
        16_384,
        keys=RUN,
    )
    batch_size: int = doc(
        "Most rows in one extraction batch (caps short rows; tokens_per_batch sets the size).", 64, keys=RUN
    )
    loss_chunk_tokens: int = doc(
        "Labelled positions per LM-head chunk of the loss: no [tokens, vocab] tensor larger than this many rows "
        "exists at once (forward or backward).",
        2_048,
        keys=RUN,
    )
    shard_rows: int = doc(
        "Rows per output shard: each shard is committed on its own, so an interrupted extraction recomputes only "
        "unfinished shards; rows are sorted by length within a shard (less padding).",
        4_096,
        keys=RUN,
    )
    num_actors: int = doc(
        "Extraction actors (each holds the proxy and all 2M adapters); one per GPU on GPU nodes.", 1, keys=RUN
    )
    cpus_per_actor: float = doc(
        "CPUs Ray reserves per extraction actor (leave one for Ray Data's read tasks).", 1.0, keys=RUN
    )
    torch_threads: int | None = doc("Intra-op threads per actor; None = max(1, int(cpus_per_actor)).", None, keys=RUN)
    gpus_per_actor: float = doc("GPUs per extraction actor; 0 on CPU-only clusters.", 0.0, keys=RUN)
    gpu_memory_fraction: float | None = doc(
        "Cap on the share of its GPU's memory an actor's torch allocator may take; None = 95% of gpus_per_actor "
        "when it is below 1 (actors sharing a GPU cannot starve each other), no cap otherwise.",
        None,
        keys=RUN,
    )
    precision: Precision = doc(
        "Extraction dtype: float32 on GPUs too, because bf16 norms move the G-SNR selection (a tenth of the top 10 % "
        "changes on a real pretrained model: docs/method.md); 'auto' = bf16 on CUDA and fp32 on CPU, or 'bfloat16', "
        "opt in to that faster, different selection; float64 for exactness checks.",
        "float32",
        keys=RESOLVED,
    )
    head_precision: Literal["float32", "model"] = doc(
        "Dtype of the LM head's logits in the loss: float32 computes them from the model's operands without rounding "
        "them (GPT-2's logits sit near -100, where bf16 rounds each by up to 0.25); 'model' keeps the "
        "extraction dtype: faster on GPU, but in bf16 it changes the selection (docs/method.md). A no-op in float32.",
        "float32",
        keys=RESOLVED,
    )

    def __post_init__(self) -> None:
        if min(self.tokens_per_batch, self.batch_size, self.loss_chunk_tokens, self.shard_rows, self.num_actors) < 1:
            raise ConfigError("tokens_per_batch, batch_size, loss_chunk_tokens, shard_rows, num_actors must be >= 1")
        if self.gpu_memory_fraction is not None and not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ConfigError("gpu_memory_fraction must be in (0, 1] or null")


@dataclass(frozen=True)
class ScoringConfig:
    eps: float = doc("Added to the late-checkpoint variance in G-SNR's denominator.", 1e-8, keys=OUTPUT)
    scorers: list[str] = doc(
        "Scorers to select with (each is its column in scoring/scores.parquet): gsnr, its ablations (g_early, "
        "g_late, drop_abs, drop_rel, drop_over_var, scale_free), and the baselines random, ifd (Superfiltering), "
        "length.",
        default_factory=lambda: list(SCORERS),
        keys=OUTPUT,
    )
    random_seed: int = doc("Seed of the random baseline.", 0, keys=OUTPUT)

    def __post_init__(self) -> None:
        unknown = [s for s in self.scorers if s not in SCORERS]
        if unknown:
            raise ConfigError(f"unknown scorer(s) {unknown}; valid: {list(SCORERS)}")
        if not self.eps >= 0:
            raise ConfigError("eps must be >= 0")


@dataclass(frozen=True)
class SelectionConfig:
    ratios: list[float] = doc(
        "Fractions of the rows with a response token to keep (the same k for every scorer).",
        default_factory=lambda: [0.05, 0.10, 0.15],
        keys=OUTPUT,
    )

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise ConfigError("ratios must be a non-empty list of fractions in (0, 1]")


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = doc(
        "Run the planted-noise audit as a stage of `run` (after selection); `gradfilter-ray audit` runs it anyway.",
        False,
        keys=OUTPUT,
    )
    rows: int = doc(
        "Rows sampled (seeded, without replacement) from the kept rows into the audit's own corpus; all kept rows "
        "when there are fewer. The audit trains its own ensemble on them (see docs/quality.md for sizing).",
        2_000,
        keys=OUTPUT,
    )
    corrupt_fraction: float = doc(
        "Share of the sample that is planted (corrupted); random selection keeps about this share of planted rows.",
        0.2,
        keys=OUTPUT,
    )
    kinds: list[str] = doc(
        "Corruption kinds, planted in equal shares: swap (the answer of another sampled row), truncate (the answer "
        "cut to its first 10-50% of words), shuffle (the answer's words in a random order). A conversation gets it "
        "in its last assistant turn.",
        default_factory=lambda: list(KINDS),
        keys=OUTPUT,
    )
    seed: int = doc("Seed of the sample and of the planted rows and their corruptions.", 0, keys=OUTPUT)

    def __post_init__(self) -> None:
        if self.rows < 10:
            raise ConfigError("rows must be >= 10")
        if not 0.0 < self.corrupt_fraction < 1.0:
            raise ConfigError("corrupt_fraction must be in (0, 1)")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"kinds must be distinct names from {list(KINDS)}, got {self.kinds}")


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSpec = doc(
        "The target LM fine-tuned on each subset.",
        default_factory=lambda: ModelSpec(name_or_path="meta-llama/Llama-2-7b-hf"),
    )
    max_length: int = doc("Max tokens per training example (response-only loss).", 1024, keys=OUTPUT)
    template: Literal["alpaca", "chat"] = doc(
        "Prompt format the target trains and answers in: alpaca, or chat (its tokenizer's chat template, or "
        "chat_template; the loss on every answer turn). As proxy.template.",
        "alpaca",
        keys=OUTPUT,
    )
    chat_template: str | None = doc(
        "Jinja chat template for template: chat when the tokenizer has none.", None, keys=OUTPUT
    )
    train_tool_calls: bool = doc("With template: chat, also train on tool-call turns.", True, keys=OUTPUT)
    method: Literal["full", "lora"] = doc(
        "Full fine-tuning (paper) or LoRA (saved merged into the model).", "full", keys=OUTPUT
    )
    lora_rank: int = doc("LoRA rank when method is lora.", 16, keys=OUTPUT)
    lora_alpha: float = doc("LoRA alpha when method is lora.", 32.0, keys=OUTPUT)
    zero_stage: Literal[2, 3] = doc(
        "DeepSpeed ZeRO stage (templates: gradfilter_ray/finetune/zero{2,3}.json).", 3, keys=RUN
    )
    offload_optimizer: bool = doc("ZeRO CPU offload of optimizer state.", False, keys=RUN)
    cpu_adam: Literal["auto", "always", "never"] = doc(
        "With offload_optimizer: DeepSpeed's multithreaded CPU Adam for the offloaded step (threads = "
        "cpus_per_worker) instead of torch's AdamW. auto = when the op was prebuilt (DS_BUILD_CPU_ADAM=1, as "
        "cluster/Dockerfile installs it); always (JIT-compiles it on each fresh node otherwise); never. (Not on/off: "
        "YAML reads those as booleans.)",
        "auto",
        keys=RUN,
    )
    learning_rate: float = doc(
        "Peak learning rate (Superfiltering recipe: 2e-5 for 7B, 1e-5 for 13B).", 2e-5, keys=OUTPUT
    )
    weight_decay: float = doc("AdamW weight decay.", 0.0, keys=OUTPUT)
    epochs: int = doc("Training epochs.", 3, keys=OUTPUT)
    effective_batch_size: int = doc(
        "Examples per optimiser step across all workers (accumulation is rounded up to meet it).", 128, keys=RESOLVED
    )
    micro_batch_size: int = doc("Examples per worker per forward.", 4, keys=OUTPUT)
    warmup_ratio: float = doc("Fraction of steps of linear warm-up before cosine decay.", 0.03, keys=OUTPUT)
    seed: int = doc("Seed of the data order and of LoRA initialisation.", 42, keys=OUTPUT)
    num_workers: int = doc("Ray Train workers per subset (one per GPU).", 8, keys=RESOLVED)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD"] = doc(
        "How a subset's workers are placed: STRICT_PACK keeps them on one node (NVLink, no collective over TCP); "
        "PACK lets a subset larger than a node span nodes.",
        "STRICT_PACK",
        keys=RUN,
    )
    backend: Literal["auto", "nccl", "gloo"] = doc(
        "Collectives between a subset's workers: auto = NCCL on GPUs, gloo on CPU (gloo on GPUs only for clusters of "
        "fake GPUs, as the placement tests use).",
        "auto",
        keys=RUN,
    )
    parallel_subsets: int | None = doc(
        "Subsets trained side by side, each by its own trainer on its own GPUs; None = as many as the cluster's "
        "GPUs (CPUs when training on CPU) hold at once.",
        None,
        keys=RUN,
    )
    cpus_per_worker: float = doc("CPUs reserved per worker.", 1.0, keys=RUN)
    gpus_per_worker: float = doc("GPUs per worker; 0 trains on CPU (DeepSpeed over gloo, fp32).", 1.0, keys=RESOLVED)
    checkpoint: Literal["none", "epoch", "steps"] = doc(
        "Resumable DeepSpeed state written while a subset trains: none (a failed worker group restarts the subset "
        "from its first step), epoch (at each epoch's end), steps (every checkpoint_every_steps optimiser steps). "
        "Never after the last step, where the final model save follows. A save is the whole ZeRO state, 12-14 "
        "bytes a parameter (81-94 GB for 7B); docs/scale.md weighs it against a subset's training time.",
        "epoch",
        keys=RUN,
    )
    checkpoint_every_steps: int = doc(
        "Optimiser steps between saves under checkpoint: steps (0 otherwise).", 0, keys=RUN
    )
    gradient_checkpointing: bool = doc(
        "Recompute activations in backward (needed for 7B/13B at length 2048).", True, keys=RUN
    )
    max_failures: int = doc(
        "Ray Train restarts of a failed worker group: from the last checkpoint, or from the subset's first step "
        "under checkpoint: none.",
        1,
        keys=RUN,
    )
    scorers: list[str] = doc(
        "Fine-tune on the selections of these scorers (one run per scorer and ratio).",
        default_factory=lambda: ["gsnr", "random", "ifd"],
        keys=OUTPUT,
    )
    ratios: list[float] | None = doc(
        "Fine-tune at these selection ratios; None = every selection.ratios.", None, keys=OUTPUT
    )
    full: bool = doc("Also fine-tune on the whole dataset (the run named 'full').", False, keys=OUTPUT)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.effective_batch_size < 1 or self.micro_batch_size < 1 or self.num_workers < 1:
            raise ConfigError("epochs, effective_batch_size, micro_batch_size and num_workers must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("warmup_ratio must be in [0, 1)")
        if self.parallel_subsets is not None and self.parallel_subsets < 1:
            raise ConfigError("parallel_subsets must be >= 1 (or null: as many as the cluster holds)")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if self.checkpoint_every_steps < 0 or (self.checkpoint == "steps") != (self.checkpoint_every_steps > 0):
            raise ConfigError(
                "checkpoint_every_steps must be >= 1 with checkpoint: steps and 0 with none or epoch (only steps "
                f"uses it); got checkpoint: {self.checkpoint}, checkpoint_every_steps: {self.checkpoint_every_steps}"
            )
        unknown = [s for s in self.scorers if s not in SCORERS]
        if unknown:
            raise ConfigError(f"scorers: unknown scorer(s) {unknown}; valid: {list(SCORERS)}")


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str | None = doc(
        "OpenAI-compatible endpoint (a hosted API or a vLLM server); None skips the judge with a message.",
        None,
        keys=OUTPUT,
    )
    model: str = doc("Judge model name.", "gpt-4", keys=OUTPUT)
    api_key_env: str = doc(
        "Environment variable holding the API key (never written anywhere).", "OPENAI_API_KEY", keys=RUN
    )
    reference: str = doc(
        "Every other run is judged against this scorer's run at the same ratio.", "random", keys=OUTPUT
    )
    concurrency: int = doc("Judge requests in flight at once.", 8, keys=RUN)
    timeout_s: float = doc("Per-request timeout.", 120.0, keys=RUN)
    max_retries: int = doc("Retries per request (429, 5xx, timeouts) with exponential backoff.", 5, keys=RUN)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ConfigError("concurrency must be >= 1, max_retries >= 0, timeout_s > 0")


@dataclass(frozen=True)
class EvaluationConfig:
    test_sets: list[str] = doc(
        "Test prompt sets: bundled names (vicuna, koala, wizardlm, sinstruct, lima) or paths to JSONL files with "
        "an `instruction` key.",
        default_factory=lambda: ["vicuna", "koala", "wizardlm", "sinstruct", "lima"],
        keys=OUTPUT,
    )
    max_prompts_per_set: int | None = doc("Use only the first N prompts of each set; None = all.", None, keys=OUTPUT)
    max_new_tokens: int = doc("Generation length.", 512, keys=OUTPUT)
    do_sample: bool = doc("Sample instead of greedy decoding.", False, keys=OUTPUT)
    temperature: float = doc("Sampling temperature (do_sample only).", 0.7, keys=OUTPUT)
    top_p: float = doc("Nucleus sampling mass (do_sample only).", 0.9, keys=OUTPUT)
    batch_size: int = doc("Prompts per batch: one generate() call (hf), one vLLM processor batch (vllm).", 8, keys=RUN)
    heldout: bool = doc(
        "Score each model's loss on the AlpacaEval 805 reference answers (text-davinci-003).", True, keys=OUTPUT
    )
    heldout_limit: int | None = doc("Use only the first N reference answers; None = all 805.", None, keys=OUTPUT)
    cpus_per_actor: float = doc("CPUs per evaluation actor.", 1.0, keys=RUN)
    gpus_per_actor: float = doc(
        "GPUs per evaluation actor; 0 evaluates on CPU. With vllm: at most 1 (a share of one GPU) or a whole number "
        "(tensor parallelism over that many GPUs).",
        1.0,
        keys=RESOLVED,
    )
    num_actors: int | None = doc(
        "Evaluation actors across all runs together, spread over the runs (each run gets at least one; runs beyond "
        "that many wait for the next wave). None = as many as the cluster holds: GPUs / gpus_per_actor on GPU, "
        "CPUs / cpus_per_actor (at most 8) on CPU.",
        None,
        keys=RUN,
    )
    engine: Literal["auto", "vllm", "hf"] = doc(
        "Answer generation: vllm (Ray Data LLM processors, needs the [vllm] extra and a GPU), hf (transformers "
        "generate, CPU or GPU), or auto (vllm when gpus_per_actor > 0 and vllm is installed, else hf). Held-out "
        "losses are scored with hf in every case.",
        "auto",
        keys=RESOLVED,
    )
    vllm_engine_kwargs: dict[str, Any] = doc(
        "Extra vLLM engine arguments (e.g. max_num_seqs, gpu_memory_utilization); they override ours.",
        default_factory=dict,
        keys=OUTPUT,
    )
    judge: JudgeConfig = doc("Pairwise LLM judge.", default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError("num_actors must be >= 1 (or null: as many as the cluster holds)")
        if self.engine == "vllm" and self.gpus_per_actor <= 0:
            raise ConfigError("engine vllm needs gpus_per_actor > 0 (use engine hf or auto on CPU)")
        if self.engine == "vllm" and self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer():
            raise ConfigError("gpus_per_actor above 1 must be a whole number for vllm (its tensor-parallel size)")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = doc(
        "Cluster address; None = RAY_ADDRESS when set (ray job submit), else an embedded local Ray.", None, keys=RUN
    )
    num_cpus: int | None = doc("CPUs of the embedded local Ray (ignored when attaching to a cluster).", None, keys=RUN)
    num_gpus: int | None = doc("GPUs of the embedded local Ray (ignored when attaching to a cluster).", None, keys=RUN)
    progress_bars: bool = doc(
        "Show Ray Data's own progress bars (per operator, counting blocks) besides the run's progress lines.",
        False,
        keys=RUN,
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = doc(
        "Ray's and the libraries' log level: at WARNING or ERROR a run prints only its own lines, INFO or DEBUG (or "
        "`--verbose`) brings their logs back (docs/console.md).",
        "WARNING",
        keys=RUN,
    )


@dataclass(frozen=True)
class Config:
    output_dir: str = doc(
        "Run directory; every stage reads and writes here. A local path (a shared mount on a cluster) or an "
        "object-store URI (s3://bucket/prefix, gs://bucket/prefix; credentials from the environment).",
        "runs/demo",
        keys=RUN,
    )
    seed: int = doc("Global seed recorded in the manifest.", 0, keys=RUN)
    data: DataConfig = doc("Input corpus.", default_factory=DataConfig)
    proxy: ProxyConfig = doc("Proxy LM and tokenisation.", default_factory=ProxyConfig)
    ensemble: EnsembleConfig = doc("LoRA ensemble training.", default_factory=EnsembleConfig)
    gradients: GradientsConfig = doc("Per-example gradient-norm extraction.", default_factory=GradientsConfig)
    scoring: ScoringConfig = doc("G-SNR and baselines.", default_factory=ScoringConfig)
    selection: SelectionConfig = doc("Subset sizes.", default_factory=SelectionConfig)
    audit: AuditConfig = doc(
        "Planted-noise audit: how well each scorer finds corrupted rows.", default_factory=AuditConfig
    )
    finetune: FinetuneConfig = doc("Target fine-tuning.", default_factory=FinetuneConfig)
    evaluation: EvaluationConfig = doc("Evaluation of the fine-tuned targets.", default_factory=EvaluationConfig)
    ray: RayConfig = doc("Ray session.", default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        try:
            check_uri(self.output_dir)
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
        missing = [r for r in self.finetune.ratios or [] if r not in self.selection.ratios]
        if missing:
            raise ConfigError(f"finetune.ratios: {missing} are not among selection.ratios {self.selection.ratios}")
        unscored = [s for s in self.finetune.scorers if s not in self.scoring.scorers]
        if unscored:
            raise ConfigError(f"finetune.scorers: {unscored} are not among scoring.scorers {self.scoring.scorers}")


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the dotted path.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp}")


def build(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively; errors name the dotted path."""
    where = path or "config"
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        dotted = ", ".join(f"{path + '.' if path else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown key(s) {dotted}; valid keys at {where}: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{path + '.' if path else ''}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key, yaml.safe_load(raw_value) if raw_value.strip() else ""


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate, return a frozen `Config`."""
    tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return build(Config, tree)


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def section_hash(*sections: Any) -> str:
    """Stable short hash of config sections (keys sorted), used to key stage outputs."""
    payload = json.dumps([to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_hash(cfg: Config) -> str:
    """Hash of everything a run computes from: the whole config except where it is written."""
    return section_hash({k: v for k, v in to_dict(cfg).items() if k != "output_dir"})


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, doc) for every leaf field, for docs and --dry-run."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append((name, f.metadata.get("doc", "")))
            rows.extend(describe(tp, name + "."))
        else:
            rows.append((name, f.metadata.get("doc", "")))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# What keys outputs: each section's fields filtered by their declared class, resolved fields by their resolved value.


def resolved_dtype(precision: str, on_gpu: bool) -> str:
    """The dtype a precision setting computes in: 'auto' is bf16 on a GPU, fp32 on CPU. The one rule: the keys use
    it, and `models.resolve_dtype` turns it into the torch dtype the stages compute in."""
    return ("bfloat16" if on_gpu else "float32") if precision == "auto" else precision


def accumulation_steps(effective_batch_size: int, micro_batch_size: int, workers: int) -> int:
    """Gradient accumulation: rounded up, so the effective batch is met or exceeded, never undershot. The one rule:
    the keys use it, and `finetune.ds_config.plan_training` plans the training with it."""
    return max(1, -(-effective_batch_size // (micro_batch_size * workers)))


def _extraction_head(cfg: Config) -> str:
    """The LM head's logits dtype in extraction: float32 is promoted with the extraction dtype (a no-op in float32
    and float64), 'model' keeps the extraction dtype."""
    body = resolved_dtype(cfg.gradients.precision, cfg.gradients.gpus_per_actor > 0)
    if cfg.gradients.head_precision == "model" or body == "float64":
        return body
    return "float32"


def _finetune_rows_per_step(cfg: Config) -> int:
    """Rows per optimiser step: micro x workers x accumulation, accumulation rounded up to meet the effective batch
    (`ds_config.plan_training`). The micro-batches are the same consecutive runs of each epoch's order however they
    are spread over workers and accumulation, so this (with the micro-batch size) is what the training computes."""
    t = cfg.finetune
    workers = t.num_workers
    return t.micro_batch_size * workers * accumulation_steps(t.effective_batch_size, t.micro_batch_size, workers)


def _evaluation_engine(cfg: Config) -> str:
    """Which engine writes the answers: vllm and hf decode differently. `auto` resolves by whether the actors have a
    GPU (vllm's presence is the cluster's, not the config's: an auto run keys as vllm on GPUs)."""
    ev = cfg.evaluation
    return ("vllm" if ev.gpus_per_actor > 0 else "hf") if ev.engine == "auto" else ev.engine


# dotted field -> the value it keys as. A field declared RESOLVED must have one (tests/test_config_keys.py).
RESOLVED_VALUES: dict[str, Any] = {
    "ensemble.precision": lambda c: resolved_dtype(c.ensemble.precision, c.ensemble.gpus_per_member > 0),
    "gradients.precision": lambda c: resolved_dtype(c.gradients.precision, c.gradients.gpus_per_actor > 0),
    "gradients.head_precision": _extraction_head,
    "finetune.effective_batch_size": _finetune_rows_per_step,
    "finetune.num_workers": _finetune_rows_per_step,
    # the target trains and evaluates in bf16 on GPUs, fp32 on CPU (`models.resolve_dtype("auto", device)`)
    "finetune.gpus_per_worker": lambda c: resolved_dtype("auto", c.finetune.gpus_per_worker > 0),
    "evaluation.gpus_per_actor": lambda c: resolved_dtype("auto", c.evaluation.gpus_per_actor > 0),
    "evaluation.engine": _evaluation_engine,
}


def key_class(dotted: str) -> str | None:
    """The declared class of a field (None for a section)."""
    cls: Any = Config
    for part in dotted.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return {f.name: f for f in dataclasses.fields(cls)}[dotted.rsplit(".", 1)[-1]].metadata.get("keys")


def keyed_value(cfg: Config, dotted: str) -> Any:
    """What `dotted` (a field or a whole section) contributes to a key: a section's fields that change outputs,
    recursively; RUN fields never, WHEN_SET fields only away from their default, RESOLVED fields as their resolved
    value."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    if dataclasses.is_dataclass(value):
        return _keyed_section(cfg, dotted, value)
    if key_class(dotted) == RUN:
        raise ValueError(f"{dotted} is declared keys=RUN: it keys nothing")
    return _leaf(cfg, dotted, key_class(dotted), value, _UNKEYED)  # a WHEN_SET leaf alone keys as its value


def _keyed_section(cfg: Config, path: str, section: Any) -> dict[str, Any]:
    keyed = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        dotted = f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            keyed[f.name] = _keyed_section(cfg, dotted, value)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        leaf = _leaf(cfg, dotted, f.metadata.get("keys"), value, default)
        if leaf is not _UNKEYED:
            keyed[f.name] = leaf
    return keyed


_UNKEYED = object()


def _leaf(cfg: Config, dotted: str, keys: str | None, value: Any, default: Any) -> Any:
    if keys == RUN or (keys == WHEN_SET and value == default):
        return _UNKEYED
    if keys == RESOLVED:
        return RESOLVED_VALUES[dotted](cfg)
    return value
