"""Extraction stage (Ray shell): stream `tokens/` through per-example LoRA gradient norms on an actor pool.

Each `NormExtractor` actor loads the frozen proxy once and all 2M adapters (M members x early/late, read by the
actor itself from ``output_dir/ensemble/``), then hands every block of tokenised rows to `extract.extract_block` (the
Ray-free core). The actors' output goes straight to ``output_dir/gradients/``; a Ray task then reads only the id
columns, to check every row of `tokens/` (which holds every `data/` id once) came out exactly once. Each block starts
at the fault point "gradients.block", which does nothing unless a test configures a handler.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from gradfilter_ray.config import Config, GradientsConfig, ProxyConfig, build
from gradfilter_ray.faults import fault_point
from gradfilter_ray.row_audit import audit_token_rows
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, run_as_task
from gradfilter_ray.storage import Location

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKEN_COLUMNS = ["id", "input_ids", "label_start", "response_input_ids", "response_label_start"]

# Fault tolerance of the actor pool is Ray Data's own (2.60 sets max_restarts=-1 and max_task_retries=-1 on actor
# pools): a killed actor (preemption, OOM kill) is restarted and the blocks it held run again on a live actor. The
# per-call bound this project used to pin went through `ray_remote_args`, which Ray deprecates (removed in 2.64) with
# no named replacement. The output is checked to hold every id exactly once before the stage is recorded as done.


def adapter_locations(ensemble: Location, members: int, early: int, late: int) -> dict[str, Location]:
    """adapter name -> its folder under `ensemble/` (member m's early and late epochs)."""
    from gradfilter_ray.gradients.extract import adapter_name  # torch and peft: not at the CLI's start-up

    return {
        adapter_name(m, checkpoint): ensemble / f"member_{m}" / f"epoch_{epoch}"
        for m in range(members)
        for checkpoint, epoch in (("early", early), ("late", late))
    }


class NormExtractor:
    """Ray Data actor: tokenised rows -> per-example squared LoRA gradient norms and losses for all 2M adapters."""

    def __init__(self, proxy: dict, gradients: dict, members: int, adapters: dict[str, Location]) -> None:
        import torch

        from gradfilter_ray.lora import load_adapters
        from gradfilter_ray.models import load_causal_lm, load_tokenizer, pick_device, resolve_dtype

        self.proxy: ProxyConfig = build(ProxyConfig, proxy, "proxy")
        self.cfg: GradientsConfig = build(GradientsConfig, gradients, "gradients")
        self.members = members
        self.device = pick_device(self.cfg.gpus_per_actor)
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.cpus_per_actor)))
        self.pad_id = load_tokenizer(self.proxy.model).pad_token_id  # padding is masked: any id would do
        base = load_causal_lm(self.proxy.model, resolve_dtype(self.cfg.precision, self.device), self.device)
        # The files are only needed while peft reads them: a Ray actor is killed without running finalizers, so a
        # folder kept for the actor's lifetime would be left behind in /tmp by every extraction.
        with tempfile.TemporaryDirectory(prefix="gfr-adapters-") as tmp:
            folders = {}
            for name, where in adapters.items():
                folders[name] = Path(tmp) / name
                for filename in ADAPTER_FILES:
                    (where / filename).get(folders[name] / filename)
            self.model = load_adapters(base, folders)

    def __call__(self, tokens: pa.Table) -> pa.Table:
        from gradfilter_ray.gradients.extract import extract_block

        fault_point("gradients.block", pid=os.getpid())
        return extract_block(
            self.model,
            tokens,
            members=self.members,
            batch_size=self.cfg.batch_size,
            device=self.device,
            pad_id=self.pad_id,
        )


def run(cfg: Config, run: RunDir, key: str) -> dict:
    import ray.data

    ens, grads = cfg.ensemble, cfg.gradients
    adapters = adapter_locations(run.ensemble, ens.members, ens.early_epoch, ens.late_epoch)
    tokens = run.tokens
    ds = ray.data.read_parquet(tokens.path, filesystem=tokens.filesystem, **IO_REMOTE_ARGS)
    ds = ds.select_columns(TOKEN_COLUMNS)
    gpu_args = {"num_gpus": grads.gpus_per_actor} if grads.gpus_per_actor > 0 else {}
    ds = ds.map_batches(
        NormExtractor,
        fn_constructor_kwargs={
            "proxy": asdict(cfg.proxy),
            "gradients": asdict(grads),
            "members": ens.members,
            "adapters": adapters,
        },
        batch_size=grads.length_bucket_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=grads.num_actors),
        num_cpus=grads.cpus_per_actor,
        **gpu_args,
    )
    started = time.perf_counter()
    out = run.gradients
    ds.write_parquet(out.path, filesystem=out.filesystem, ray_remote_args=IO_REMOTE_ARGS)
    seconds = time.perf_counter() - started

    audit = run_as_task(audit_token_rows, tokens, out)
    rows = audit["rows"]
    return {
        "rows": rows,
        "rows_no_response_tokens": audit["rows_no_response_tokens"],
        "adapters": len(adapters),
        "seconds_streaming": round(seconds, 2),
        "examples_per_s": round(rows / seconds, 2),
        "tokens_per_s": round(audit["tokens"] / seconds, 1),
        "norms_per_s": round(rows * len(adapters) / seconds, 2),
    }
