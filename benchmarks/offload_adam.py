"""Offloaded optimiser step: DeepSpeed's CPU Adam vs torch's AdamW, side by side in one process.

With `finetune.offload_optimizer` the optimiser state lives in CPU memory and the Adam step runs on the CPU: for 7B
that is 7e9 parameters updated per step on the host, so the CPU optimiser's speed is the step time. This runs the
finetune stage's own pieces (`deepspeed_config` with offload, `worker._optimizer`) on a one-process ZeRO-2 engine
with the optimiser offloaded, once with `cpu_adam` on and once off, the same weights and data, and times
`engine.step()` alone (forward and backward are the same in both) over alternating rounds. It checks that the
first step from the same weights and gradients gives the same weights under both (to 1e-6, about 1/1000 of an lr
1e-3 step; later steps drift apart, as Adam turns tiny differences in near-zero gradients into whole steps) and
writes benchmarks/results/offload_adam.json.

    .venv/bin/python benchmarks/offload_adam.py [--params-m 50] [--steps 6] [--quick]

CPU Adam is JIT-compiled on first use where it was not prebuilt (38 s on this machine; cached afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_engine(cpu_adam: bool, width: int, layers: int, threads: int):
    import deepspeed
    import torch

    from gradfilter_ray.config import FinetuneConfig, ModelSpec
    from gradfilter_ray.finetune.ds_config import deepspeed_config, plan_training
    from gradfilter_ray.finetune.worker import _optimizer

    cfg = FinetuneConfig(
        model=ModelSpec(name_or_path="unused"),
        zero_stage=2,
        offload_optimizer=True,
        cpu_adam="always" if cpu_adam else "never",
        effective_batch_size=2,
        micro_batch_size=2,
        num_workers=1,
        learning_rate=1e-3,
        cpus_per_worker=threads,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = _optimizer(cfg, list(model.parameters()), cpu_adam)
    config = deepspeed_config(cfg, plan_training(8, cfg, 1), bf16=False, cpu_adam=cpu_adam)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-m", type=float, default=50.0, help="model size in millions of parameters")
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.quick:
        args.params_m, args.steps, args.rounds = 4.0, 2, 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # as the worker sets it: CPU Adam sizes its pool from it
    import deepspeed
    import torch

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a minutes-long JIT build gloo never uses
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(args.threads)
    width = 1024
    layers = max(1, round(args.params_m * 1e6 / (width * width + width)))
    started = time.perf_counter()
    engines = {name: build_engine(name == "cpu_adam", width, layers, args.threads) for name in ("cpu_adam", "torch")}
    setup_s = time.perf_counter() - started
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(1))
    step_s: dict[str, list[float]] = {name: [] for name in engines}
    first_step = {}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            engine = engines[name]
            for _ in range(args.steps):
                loss = engine(x).pow(2).mean()
                engine.backward(loss)
                t = time.perf_counter()
                engine.step()
                step_s[name].append(time.perf_counter() - t)
                if name not in first_step:
                    first_step[name] = [p.detach().clone() for p in engine.module.parameters()]
    a, b = first_step["cpu_adam"], first_step["torch"]
    max_diff = max(float((p - q).abs().max()) for p, q in zip(a, b))
    median = {n: statistics.median(v) for n, v in step_s.items()}
    params = sum(p.numel() for p in a)
    result = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
        "params": params,
        "steps_each": len(step_s["cpu_adam"]),
        "step_seconds_median": median,
        "params_per_second": {n: params / s for n, s in median.items()},
        "speedup_cpu_adam_over_torch": median["torch"] / median["cpu_adam"],
        "max_abs_weight_diff_after_one_step": max_diff,
        "setup_seconds_both": setup_s,
        "quick": args.quick,
    }
    print(json.dumps(result, indent=2))
    if max_diff > 1e-6:
        sys.exit(f"the two optimisers disagree: max |w_cpu_adam - w_torch| = {max_diff:.2e}")
    out = Path(args.out) / ("offload_adam.quick.json" if args.quick else "offload_adam.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
