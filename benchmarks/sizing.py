"""The sizing table: accelerator-hours and devices for a corpus, from throughput measured by gpu_check.py; and the
fine-tuning plan: micro-batch, ZeRO stage and checkpoint policy of the shipped 7B/13B configs, from an estimate.

    make gpu-check                                                    # on the GPU you will use
    python3 benchmarks/sizing.py --check benchmarks/results/gpu_check.json [--hours 4]
    python3 benchmarks/sizing.py --plan                               # no GPU: the estimate docs/scale.md shows

--check writes benchmarks/results/sizing.{md,json}. Only measured numbers go in: the ensemble member loop's and the
extraction actor's throughput on the checked device, counted in tokens, and the corpus's measured token lengths
(benchmarks/results/alpaca_token_lengths.json, the proxy's GPT-2 tokenisation). The scaling assumptions, printed
with the table: cost is linear in the tokens computed, padding included (a member's random batch of
ensemble.batch_size rows is padded to its longest row; extraction batches are sorted by length, so their padding is
left out); extraction cost is linear in the number of adapters (2M: every adapter needs its own forward and
backward, since LoRA changes the activations), so a measurement with A adapters scales by 2M / A.

Below it, target fine-tuning and evaluation for the shipped configs (jobs/configs: Alpaca with LLaMA-2 7B and 13B,
the 1M-row template): the check's ~1B LLaMA measurement scaled by parameter count (benchmarks/sizing_target.py
states and prints its assumptions). A check without the target step gives the first table alone.

--plan writes benchmarks/results/finetune_plan.{md,json}: for each shipped target, every ZeRO stage x micro-batch
that keeps the config's effective batch, with its compute, communication and memory per GPU on two 8-GPU nodes
(`step_estimate`, `memory_per_gpu`: the formulas and constants are stated in NODES, MFU and their docstrings), the
choice (`choose_batching`), and the checkpoint policy weighed against a subset's training time
(`checkpoint_tradeoff`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sizing_target import (  # noqa: E402
    CONFIGS,
    LLAMA2,
    SHIPPED,
    TargetMeasured,
    TokenLengths,
    checkpoint_bytes_per_param,
    estimate,
    llama_params,
    load_lengths,
    size_key,
    subset_runs,
    totals,
)
from sizing_target import markdown as target_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Measured:
    device: str
    member_examples_per_s: float  # one ensemble member training alone on the check's rows (rows x epochs / seconds)
    member_tokens_per_s: float  # the same, in tokens computed (padding included)
    extract_examples_per_s: float  # extraction of the check's rows, every measured adapter per example
    extract_tokens_per_s: float  # the same, in tokens computed (padding included)
    extract_adapters: int
    check_mean_tokens: float  # the check's synthetic rows (not the corpus's)
    extract_dtype: str = "float32"  # what the check extracted in (gradients.precision on its device)
    bytes_per_token: float | None = None  # the norm kernel's peak above the resident model, per batch token
    device_memory_bytes: int | None = None

    @classmethod
    def from_check(cls, check: dict) -> Measured:
        members = check.get("ensemble") or []
        extraction = check.get("extraction") or {}
        if not members or "examples_per_s" not in extraction:
            raise ValueError("the check holds no ensemble or extraction throughput: re-run gpu_check.py")
        stats = extraction.get("stats") or {}
        if not stats.get("real_tokens") or not stats.get("padded_tokens"):
            raise ValueError("the check's extraction has no token counts (stats.real_tokens): re-run gpu_check.py")
        env = check.get("environment", {})
        # The members' rows: their own mean length (extraction may read a subset of them).
        mean_tokens = stats["real_tokens"] / extraction["rows"]
        member_s = sum(m["seconds"] for m in members)
        member_padded = sum(
            m["rows"] * m["epochs"] * m.get("mean_tokens", mean_tokens) / m["padding_efficiency"] for m in members
        )
        return cls(
            device=env.get("gpu") or env.get("device", "?"),
            member_examples_per_s=sum(m["rows"] * m["epochs"] for m in members) / member_s,
            member_tokens_per_s=member_padded / member_s,
            extract_examples_per_s=extraction["examples_per_s"],
            extract_tokens_per_s=extraction["examples_per_s"] * stats["padded_tokens"] / extraction["rows"],
            extract_adapters=extraction["adapters"],
            check_mean_tokens=mean_tokens,
            extract_dtype=extraction.get("dtype", "float32"),
            bytes_per_token=(check.get("memory_per_token") or {}).get("bytes_per_token"),
            device_memory_bytes=env.get("gpu_memory_bytes"),
        )

    def member_rate(self, lengths: TokenLengths, batch: int) -> float:
        """Corpus examples/s of one member: its tokens/s over what a row costs in a random batch of `batch`."""
        return self.member_tokens_per_s / lengths.padded_per_row(batch)

    def extract_rate(self, lengths: TokenLengths) -> float:
        """Corpus examples/s of the extraction (length-sorted batches: a row costs its own tokens)."""
        return self.extract_tokens_per_s / lengths.mean

    def tokens_per_batch(self, headroom: float = 0.7) -> int | None:
        """The largest power-of-two token budget whose kernel peak fits in `headroom` of the device's memory (the
        rest holds the model, the 2M adapters and the allocator's slack)."""
        if not self.bytes_per_token or not self.device_memory_bytes:
            return None
        fits = headroom * self.device_memory_bytes / self.bytes_per_token
        return 2 ** int(math.log2(fits)) if fits >= 1 else None


@dataclass(frozen=True)
class Size:
    examples: int
    ensemble_device_hours: float
    extract_device_hours: float
    devices_for_deadline: int  # devices so that ensemble + extraction end within `hours`

    @property
    def total_device_hours(self) -> float:
        return self.ensemble_device_hours + self.extract_device_hours


def size_for(
    measured: Measured, examples: int, members: int, epochs: int, hours: float, lengths: TokenLengths, batch: int
) -> Size:
    ensemble_s = members * epochs * examples / measured.member_rate(lengths, batch)
    extract_s = examples / measured.extract_rate(lengths) * (2 * members / measured.extract_adapters)
    total_h = (ensemble_s + extract_s) / 3600
    return Size(examples, ensemble_s / 3600, extract_s / 3600, max(1, math.ceil(total_h / hours)))


def markdown(
    measured: Measured, sizes: list[Size], members: int, epochs: int, hours: float, lengths: TokenLengths, batch: int
) -> str:
    lines = [
        f"Measured on {measured.device}, in tokens computed (padding included): ensemble member "
        f"{measured.member_tokens_per_s:,.0f} tokens/s ({measured.member_examples_per_s:.1f} examples/s), extraction "
        f"{measured.extract_tokens_per_s:,.0f} tokens/s ({measured.extract_examples_per_s:.1f} examples/s) with "
        f"{measured.extract_adapters} adapters, on the check's synthetic rows of {measured.check_mean_tokens:.0f} "
        "tokens on average.",
        f"Scaled by tokens to the corpus's rows: {lengths.mean:.1f} tokens on average under {lengths.tokenizer} at "
        f"max_length {lengths.max_length} (the bundled Alpaca sample, measured), {lengths.padded_per_row(batch):.1f} "
        f"a row in a member's random batch of {batch} (padded to its longest row): member "
        f"{measured.member_rate(lengths, batch):.1f} examples/s, extraction {measured.extract_rate(lengths):.1f} "
        "examples/s. Cost is taken as linear in tokens computed.",
        f"M = {members} members, {epochs} epochs, extraction over 2M = {2 * members} adapters (cost linear in "
        "adapters); target fine-tuning and evaluation are sized below, when the check measured them.",
        *(
            [
                f"Norm kernel memory {measured.bytes_per_token / 1024:.0f} KiB per batch token for the checked proxy "
                f"(GPT-2 124M, {measured.extract_dtype}): with that proxy and one extraction actor per GPU, set "
                f"gradients.tokens_per_batch up to {measured.tokens_per_batch():,} on this device (scale it by "
                "gradients.gpu_memory_fraction when actors share a GPU)."
            ]
            if measured.tokens_per_batch()
            else []
        ),
        "",
        f"| examples | ensemble device-h | extraction device-h | total device-h | devices to finish in {hours:g} h |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in sizes:
        lines.append(
            f"| {s.examples:,} | {s.ensemble_device_hours:.2f} | {s.extract_device_hours:.2f} | "
            f"{s.total_device_hours:.2f} | {s.devices_for_deadline} |"
        )
    return "\n".join(lines) + "\n"


# --- the fine-tuning plan: micro-batch, ZeRO stage and checkpoint policy, estimated (no GPU has run them) ---


@dataclass(frozen=True)
class Node:
    name: str
    short: str
    gpus: int
    peak_flops: float  # dense bf16 FLOP/s a GPU (vendor peak)
    link_bytes_per_s: float  # what NCCL's ring all-gather / reduce-scatter sustain a GPU inside the node (bus bw)
    memory_bytes: float


# Bus bandwidth: 80 % of NVLink's one-way bandwidth a GPU (A100 NVLink 3: 300 GB/s; H100 NVLink 4: 450 GB/s),
# about what nccl-tests report for all-gather on these nodes. Memory: 80e9 bytes (the cards hold 80 GiB).
NODES = (
    Node("8x A100-SXM4-80GB", "A100", 8, 312e12, 240e9, 80e9),
    Node("8x H100-SXM5-80GB", "H100", 8, 989e12, 360e9, 80e9),
)
MFU = 0.40  # of the dense bf16 peak, for the compute alone: a higher MFU makes communication weigh more
MEMORY_USABLE = 0.9  # of a GPU's memory: the rest is the allocator's fragmentation
FIXED_BYTES = 3e9  # CUDA context, NCCL buffers and cuBLAS workspaces a GPU
STORAGE_BYTES_PER_S = 2e9  # a node's ranks writing one checkpoint together to the run directory (shared storage)
EPOCH_OVERHEAD_MAX = 0.05  # epoch checkpoints when their writes cost at most this share of a subset's training
MICRO_BATCHES = (1, 2, 4, 8, 16)


def comm_bytes_per_step(params: int, stage: int, world: int, accumulation: int, recompute: bool) -> float:
    """Bytes each GPU sends (= receives) in ring collectives per optimiser step: (world - 1) / world of each
    collective's size. Every micro-batch reduce-scatters the gradients in fp32 (communication_data_type), 4 bytes a
    parameter, under both stages. ZeRO-3 also all-gathers the bf16 weights (2 bytes a parameter) for the forward,
    the backward, and with gradient checkpointing once more for the recomputed forward (an upper bound: DeepSpeed
    may keep a layer gathered between its recompute and its backward); ZeRO-2 keeps them whole and all-gathers
    the updated bf16 weights once after the optimiser step."""
    ring = (world - 1) / world
    reduce = 4 * params * ring
    if stage == 3:
        gathers = 3 if recompute else 2
        return accumulation * (gathers * 2 * params * ring + reduce)
    return accumulation * reduce + 2 * params * ring


def flops_per_step(params: int, micro: int, accumulation: int, tokens_per_row: float, recompute: bool) -> float:
    """FLOPs a GPU computes per optimiser step: 6 a parameter a token (forward + backward), 8 with the recomputed
    forward; tokens padded to each micro-batch's longest row. Attention's own FLOPs (~4 x layers x length x hidden
    a token: ~1 % at these lengths) are left out."""
    return (8 if recompute else 6) * params * micro * accumulation * tokens_per_row


def memory_per_gpu(
    params: int, shape: dict, stage: int, micro: int, max_length: int, world: int, zero: dict, recompute: bool
) -> dict[str, float]:
    """Peak bytes a GPU holds, by part (bf16 weights, fp32 gradient accumulation and communication, AdamW):
    - ZeRO-3: weights, gradients and optimiser state partitioned: bf16 weights 2, bf16 gradient partition 2, fp32
      accumulated gradients 4, fp32 master weights and Adam's two moments 12 bytes a parameter, over `world`; plus
      the gathered weights (stage3_max_live_parameters and the prefetch bucket, bf16).
    - ZeRO-2: bf16 weights whole (2 bytes a parameter); the gradient partition (bf16 2), fp32 accumulated
      gradients 4 and their flat fp32 copy at the accumulation boundary 4, master and moments 12, over `world`;
      plus the all-gather bucket (bf16).
    - Both: two fp32 reduce buckets (overlap_comm double-buffers them); the bucket sizes are the template's.
    - Activations of a micro-batch of `max_length` tokens a row (its longest row sets every row's length): with
      gradient checkpointing each layer's input (bf16 hidden) and one layer's working set while it is recomputed,
      2 x (13 hidden + 4 intermediate) bytes a token (norms in fp32, q/k/v, rotary q/k, attention and MLP
      outputs, the SwiGLU's four intermediate tensors); without, that working set for every layer. The logits and
      the loss: bf16 logits, their fp32 copy, fp32 log-softmax and its gradient: 14 bytes a token a vocabulary
      entry. Attention scores are never materialised (SDPA's fused kernels).
    - FIXED_BYTES for the CUDA context, NCCL and workspaces."""
    n, w = params, world
    h, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    vocab = shape.get("vocab_size", 32000)
    reduce_buckets = 2 * 4 * float(zero.get("reduce_bucket_size", 5e8))
    if stage == 3:
        gathered = float(zero.get("stage3_max_live_parameters", 1e9)) + float(
            zero.get("stage3_prefetch_bucket_size", 5e7)
        )
        parts = {
            "weights": 2 * n / w,
            "gradients": (2 + 4) * n / w,
            "optimizer": 12 * n / w,
            "buffers": reduce_buckets + 2 * gathered,
        }
    else:
        parts = {
            "weights": 2 * n,
            "gradients": (2 + 4 + 4) * n / w,
            "optimizer": 12 * n / w,
            "buffers": reduce_buckets + 2 * float(zero.get("allgather_bucket_size", 5e8)),
        }
    tokens = micro * max_length
    layer = tokens * 2 * (13 * h + 4 * inter)
    parts["activations"] = (layers * tokens * h * 2 + layer if recompute else layers * layer) + tokens * vocab * 14
    parts["fixed"] = FIXED_BYTES
    return parts


@dataclass(frozen=True)
class StepEstimate:
    node: str
    stage: int
    micro: int
    accumulation: int
    tokens_per_row: float  # padded
    compute_s: float
    comm_bytes: float  # a GPU, a step
    comm_s: float
    memory_bytes: float
    fits: bool

    @property
    def overlapped_s(self) -> float:
        """Communication entirely hidden behind compute (overlap_comm, ZeRO-3 prefetch): the lower bound."""
        return max(self.compute_s, self.comm_s)

    @property
    def serial_s(self) -> float:
        """Nothing overlapped: the upper bound."""
        return self.compute_s + self.comm_s


def step_estimate(
    params: int,
    shape: dict,
    stage: int,
    micro: int,
    accumulation: int,
    tokens_per_row: float,
    max_length: int,
    node: Node,
    zero: dict,
    recompute: bool = True,
    mfu: float = MFU,
) -> StepEstimate:
    compute = flops_per_step(params, micro, accumulation, tokens_per_row, recompute) / (node.peak_flops * mfu)
    moved = comm_bytes_per_step(params, stage, node.gpus, accumulation, recompute)
    memory = sum(memory_per_gpu(params, shape, stage, micro, max_length, node.gpus, zero, recompute).values())
    return StepEstimate(
        node=node.name,
        stage=stage,
        micro=micro,
        accumulation=accumulation,
        tokens_per_row=tokens_per_row,
        compute_s=compute,
        comm_bytes=moved,
        comm_s=moved / node.link_bytes_per_s,
        memory_bytes=memory,
        fits=memory <= MEMORY_USABLE * node.memory_bytes,
    )


def candidates(finetune, lengths: TokenLengths, nodes=NODES) -> list[list[StepEstimate]]:
    """For each ZeRO stage x micro-batch whose accumulation meets the effective batch exactly (the recipe's batch,
    not a larger one): its estimate on every node, with the ZeRO section `ds_config.deepspeed_config` builds."""
    from gradfilter_ray.finetune.ds_config import deepspeed_config, plan_training

    key = size_key(finetune.model.name_or_path or "")
    params, shape = llama_params(LLAMA2[key]), LLAMA2[key]
    out = []
    for stage in (2, 3):
        for micro in MICRO_BATCHES:
            ft = replace(finetune, zero_stage=stage, micro_batch_size=micro)
            plan = plan_training(ft.effective_batch_size, ft, ft.num_workers)
            if plan.global_batch != ft.effective_batch_size:
                continue
            zero = deepspeed_config(ft, plan, bf16=True)["zero_optimization"]
            out.append(
                [
                    step_estimate(
                        params,
                        shape,
                        stage,
                        micro,
                        plan.accumulation_steps,
                        lengths.padded_per_row(micro),
                        ft.max_length,
                        node,
                        zero,
                        ft.gradient_checkpointing,
                    )  # fmt: skip
                    for node in nodes
                ]
            )
    return out


def regrets(options: list[list[StepEstimate]]) -> list[float]:
    """Each option's worst slowdown against the best option that fits, over every node and both bounds (overlapped,
    serial): the choice must be near the best whichever node runs it and however much overlap DeepSpeed gets."""
    fitting = [o for o in options if all(e.fits for e in o)]
    worst = []
    for option in options:
        if option not in fitting:
            worst.append(math.inf)
            continue
        ratios = []
        for i in range(len(option)):
            for bound in ("overlapped_s", "serial_s"):
                best = min(getattr(o[i], bound) for o in fitting)
                ratios.append(getattr(option[i], bound) / best - 1)
        worst.append(max(ratios))
    return worst


def choose_batching(options: list[list[StepEstimate]]) -> list[StepEstimate]:
    """The option of least worst-case regret (`regrets`); ties go to the smaller memory."""
    scored = zip(regrets(options), options)
    return min(scored, key=lambda r: (r[0], max(e.memory_bytes for e in r[1])))[1]


@dataclass(frozen=True)
class CheckpointTradeoff:
    config: str
    node: str
    rows: int  # the config's largest subset: the longest training, where checkpoints weigh least
    steps: int
    train_s: float  # serial bound of the config's batching on this node
    save_bytes: float
    save_s: float
    epoch_saves: int
    epochs: int

    @property
    def overhead(self) -> float:
        """Share of the subset's training time that the epoch policy's writes add."""
        return self.epoch_saves * self.save_s / self.train_s

    @property
    def breakeven_failure_probability(self) -> float:
        """The chance of a failure per subset run above which epoch checkpoints save time on average: a failure at
        a uniformly random moment costs half the subset without checkpoints, half an epoch with them."""
        lost_saved = self.train_s / 2 * (1 - 1 / self.epochs)
        return self.epoch_saves * self.save_s / lost_saved if lost_saved > 0 else math.inf


def checkpoint_tradeoff(name: str, step: StepEstimate, storage_bytes_per_s: float = STORAGE_BYTES_PER_S):
    """The epoch policy's cost on `name`'s largest subset, with the step time of its chosen batching on one node."""
    from gradfilter_ray.config import load
    from gradfilter_ray.finetune.ds_config import checkpoint_steps, plan_training

    cfg = load(CONFIGS / f"{name}.yaml")
    ft = cfg.finetune
    rows = int(SHIPPED[name] * max(r for r, _ in subset_runs(cfg)))
    plan = plan_training(rows, ft, ft.num_workers)
    save = checkpoint_bytes_per_param(step.stage) * llama_params(LLAMA2[size_key(ft.model.name_or_path or "")])
    return CheckpointTradeoff(
        config=name,
        node=step.node,
        rows=rows,
        steps=plan.total_steps,
        train_s=plan.total_steps * step.serial_s,
        save_bytes=save,
        save_s=save / storage_bytes_per_s,
        epoch_saves=len(checkpoint_steps(plan, "epoch")),
        epochs=ft.epochs,
    )


def checkpoint_policy(tradeoffs: list[CheckpointTradeoff]) -> str:
    """epoch when its writes cost at most EPOCH_OVERHEAD_MAX of the training on every node (they weigh most on the
    fastest), else none: a failure then repeats at most one subset, which the writes would have cost more than."""
    return "epoch" if max(t.overhead for t in tradeoffs) <= EPOCH_OVERHEAD_MAX else "none"


def plan(names=tuple(SHIPPED), nodes=NODES) -> dict:
    """The estimate for every shipped config: its batching options, the choice, and the checkpoint policy."""
    from gradfilter_ray.config import load

    lengths = load_lengths("llama2")
    out = {}
    for name in names:
        ft = load(CONFIGS / f"{name}.yaml").finetune
        options = candidates(ft, lengths, nodes)
        chosen = choose_batching(options)
        shipped = next(o for o in options if (o[0].stage, o[0].micro) == (ft.zero_stage, ft.micro_batch_size))
        tradeoffs = [checkpoint_tradeoff(name, step) for step in shipped]
        out[name] = {
            "target": f"LLaMA-2 {size_key(ft.model.name_or_path or '').upper()}",
            "max_length": ft.max_length,
            "effective_batch": ft.effective_batch_size,
            "gpus": ft.num_workers,
            "options": options,
            "regrets": regrets(options),
            "chosen": chosen,
            "shipped": shipped,
            "tradeoffs": tradeoffs,
            "policy": checkpoint_policy(tradeoffs),
            "shipped_policy": ft.checkpoint,
        }
    return out


def plan_markdown(planned: dict, nodes=NODES) -> str:
    lengths = load_lengths("llama2")
    max_lengths = "/".join(str(m) for m in sorted({p["max_length"] for p in planned.values()}))
    lines = [
        "Estimated, not measured: no GPU has run these configs.",
        "",
        "- Nodes: "
        + "; ".join(
            f"{n.name}, {n.peak_flops / 1e12:.0f} TFLOP/s dense bf16 a GPU, {n.link_bytes_per_s / 1e9:.0f} GB/s "
            f"NVLink bus bandwidth a GPU, {n.memory_bytes / 1e9:.0f} GB"
            for n in nodes
        )
        + ".",
        f"- Compute at {MFU:.0%} MFU: 8 x parameters FLOPs a token (forward, backward, recomputed forward), every row "
        f"padded to its micro-batch's longest: {lengths.mean:.1f} tokens a row on average under LLaMA-2's tokenizer "
        f"(the bundled Alpaca sample, measured), {lengths.padded_per_row(4):.0f} padded at micro-batch 4.",
        "- Communication (ring collectives, (GPUs - 1) / GPUs of each): fp32 gradients reduce-scattered every "
        "micro-batch (both stages); ZeRO-3 gathers the bf16 weights 3 times a micro-batch (forward, recompute, "
        "backward: an upper bound), ZeRO-2 once a step after the optimiser.",
        "- Memory a GPU: bf16 weights (whole under ZeRO-2), bf16 gradient partition, fp32 accumulated gradients, fp32 "
        "master weights and Adam's moments, the ZeRO templates' buckets; activations with gradient checkpointing "
        f"of a micro-batch whose longest row is max_length ({max_lengths}), logits and loss included; "
        f"{FIXED_BYTES / 1e9:.0f} GB for CUDA and NCCL. It fits when <= {MEMORY_USABLE:.0%} of the GPU.",
        "- A step takes between max(compute, comm) (communication hidden behind compute) and compute + comm (none "
        "hidden). The choice: of the options that fit, the one whose worst slowdown against the best, over both "
        "nodes and both bounds, is least.",
    ]
    seen: dict[tuple, str] = {}
    for name, p in planned.items():
        same = tuple((e.stage, e.micro, e.accumulation, e.compute_s, e.comm_s, e.memory_bytes) for o in p["options"]
                     for e in o)  # fmt: skip
        if same in seen:
            lines += ["", f"**{name}** ({p['target']}): the same options and choice as {seen[same]}."]
            continue
        seen[same] = name
        lines += [
            "",
            f"**{name}** ({p['target']}), effective batch {p['effective_batch']} on {p['gpus']} GPUs:",
            "",
            "| ZeRO | micro x accumulation | padded tokens/row | "
            + " | ".join(f"{n.short}: compute / comm s, step s" for n in nodes)
            + " | GB moved/GPU/step | memory GB/GPU | worst slowdown |",
            "| --- | --- | --- | " + " | ".join("---" for _ in nodes) + " | --- | --- | --- |",
        ]
        for option, regret in zip(p["options"], p["regrets"]):
            e = option[0]
            mark = " **chosen**" if option is p["chosen"] else ""
            times = " | ".join(
                f"{s.compute_s:.2f} / {s.comm_s:.2f}, {s.overlapped_s:.2f}-{s.serial_s:.2f}" for s in option
            )
            slowdown = f"{regret:.0%}" if math.isfinite(regret) else "does not fit"
            lines.append(
                f"| {e.stage}{mark} | {e.micro} x {e.accumulation} | {e.tokens_per_row:.0f} | {times} | "
                f"{e.comm_bytes / 1e9:.0f} | {e.memory_bytes / 1e9:.1f} | {slowdown} |"
            )
    lines += [
        "",
        "Checkpoint policy: the epoch policy's writes against each config's largest subset, trained with its "
        "shipped batching at the serial step time (the longest training: where checkpoints weigh least). A save "
        "is the measured bf16 ZeRO state (12.0 bytes a parameter under ZeRO-3, 14.0 under ZeRO-2) written at "
        f"{STORAGE_BYTES_PER_S / 1e9:g} GB/s a node. epoch when its writes add at most {EPOCH_OVERHEAD_MAX:.0%} "
        "on both nodes, else none. The break-even failure probability (per subset run) is where the writes "
        "equal the time they save on average: half the subset lost without them, half an epoch with them.",
        "",
        "| config | rows | steps | node | training min | save GB | save s | epoch saves | overhead | "
        "break-even failure probability | policy (shipped) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in planned.items():
        for t in p["tradeoffs"]:
            lines.append(
                f"| {name} | {t.rows:,} | {t.steps:,} | {t.node} | {t.train_s / 60:.1f} | {t.save_bytes / 1e9:.0f} | "
                f"{t.save_s:.0f} | {t.epoch_saves} | {t.overhead:.1%} | "
                f"{min(t.breakeven_failure_probability, 1):.2f} | {p['policy']} ({p['shipped_policy']}) |"
            )
    return "\n".join(lines) + "\n"


def plan_json(planned: dict) -> dict:
    def row(option):
        return [asdict(e) | {"overlapped_s": e.overlapped_s, "serial_s": e.serial_s} for e in option]

    return {
        name: {
            "options": [row(o) for o in p["options"]],
            "regrets": [r if math.isfinite(r) else None for r in p["regrets"]],
            "chosen": row(p["chosen"]),
            "shipped": row(p["shipped"]),
            "checkpoint": [
                asdict(t) | {"overhead": t.overhead, "breakeven_failure_probability": t.breakeven_failure_probability}
                for t in p["tradeoffs"]
            ],
            "policy": p["policy"],
            "shipped_policy": p["shipped_policy"],
        }
        for name, p in planned.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", default=str(RESULTS / "gpu_check.json"))
    ap.add_argument("--plan", action="store_true", help="the fine-tuning plan estimate alone (no check read)")
    ap.add_argument("--examples", type=int, nargs="+", default=[52_002, 1_000_000])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--member-batch", type=int, default=16, help="ensemble.batch_size (random batches)")
    ap.add_argument("--hours", type=float, default=4.0, help="wall-clock target for ensemble + extraction")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.plan:
        planned = plan()
        text = plan_markdown(planned)
        print(text, end="")
        (out / "finetune_plan.md").write_text(text)
        (out / "finetune_plan.json").write_text(json.dumps(plan_json(planned), indent=2))
        return 0

    check = json.loads(Path(args.check).read_text())
    measured = Measured.from_check(check)
    proxy_lengths, target_lengths = load_lengths("gpt2"), load_lengths("llama2")
    sizes = [
        size_for(measured, n, args.members, args.epochs, args.hours, proxy_lengths, args.member_batch)
        for n in args.examples
    ]
    target = TargetMeasured.from_check(check)
    estimates = (
        [e for name, rows in SHIPPED.items() for e in estimate(target, name, rows, target_lengths)] if target else []
    )
    table = markdown(measured, sizes, args.members, args.epochs, args.hours, proxy_lengths, args.member_batch)
    table += "\n" + target_markdown(target, estimates, target_lengths)
    print(table, end="")
    (out / "sizing.md").write_text(table)
    result = {
        "measured": asdict(measured),
        "corpus_lengths": {
            "tokenizer": proxy_lengths.tokenizer,
            "max_length": proxy_lengths.max_length,
            "rows": proxy_lengths.rows,
            "mean_tokens": proxy_lengths.mean,
            "padded_per_row": proxy_lengths.padded_per_row(args.member_batch),
        },
        "sizes": [asdict(s) for s in sizes],
        "target": {
            "measured": asdict(target) if target else None,
            "estimates": [asdict(e) for e in estimates],
            "totals": totals(estimates),
        },
        "args": vars(args),
    }
    (out / "sizing.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
