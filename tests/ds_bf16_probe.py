"""Run as a script by tests/test_finetune_core.py: DeepSpeed (one process, gloo, CPU) initialised from this project's
bf16 config for ZeRO 2 and 3, two optimiser steps each; prints what the engine took as its data types."""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402

from gradfilter_ray.config import FinetuneConfig, ModelSpec  # noqa: E402
from gradfilter_ray.finetune.ds_config import deepspeed_config, plan_training  # noqa: E402

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a minutes-long JIT build (FIELD-NOTES)
deepspeed.init_distributed(dist_backend="gloo")
seen = {}
for stage in (2, 3):
    cfg = FinetuneConfig(
        model=ModelSpec(name_or_path="unused"), zero_stage=stage, effective_batch_size=4, micro_batch_size=2,
        num_workers=1,
    )  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config=deepspeed_config(cfg, plan_training(8, cfg, 1), bf16=True),
    )  # fmt: skip
    for _ in range(4):  # two optimiser steps of two micro-batches
        loss = engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    model_dtype, accum_dtype = engine.get_data_types()
    seen[stage] = {
        "model": str(model_dtype),
        "accumulate": str(accum_dtype),
        "reduce": str(engine.communication_data_type),
    }
print(json.dumps(seen), flush=True)
# Tear down here, not at interpreter exit: gloo's and DeepSpeed's background threads, destroyed during Python's own
# teardown, ended the process with SIGABRT ("terminate called without an active exception") on some machines.
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
