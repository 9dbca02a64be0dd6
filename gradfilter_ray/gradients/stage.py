"""Extraction stage (Ray shell): stream the corpus through per-example LoRA gradient norms on an actor pool.

Each `NormExtractor` actor loads the frozen proxy once and all 2M adapters (M members x early/late, read by the
actor itself from ``output_dir/ensemble/``), tokenises each incoming batch once, sorts it by length (less padding),
and for every sub-batch runs the batched exact-norm kernel once per adapter. The actors' output goes straight to
``output_dir/gradients/``; the driver reads only the id columns, to check every row came out exactly once.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradfilter_ray.config import Config, GradientsConfig, ProxyConfig, build
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, run_as_task
from gradfilter_ray.storage import Location

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Test-only fault-injection hook, off unless this variable names a folder in the driver's environment: each actor then
# logs "pid call" per batch to `calls.log` there, and the first actor to reach its second batch waits (at most
# HOOK_WAIT_S) until a file `killed` appears, so a test can kill it mid-stream at a known point. Read by the driver
# and passed to the actors (Ray workers do not see the driver's environment).
TEST_HOOK_ENV = "GFR_TEST_EXTRACT_HOOK_DIR"
HOOK_WAIT_S = 120.0

# Fault tolerance of the actor pool, pinned here rather than left to Ray Data's defaults: a killed actor (preemption,
# OOM kill) is restarted without limit and the batches it held run again on a live actor, each at most
# EXTRACT_TASK_RETRIES more times, so a batch that kills its actor every time fails the stage instead of looping.
# The output is checked to hold every id exactly once before it is committed (tests/test_faults.py kills an actor).
EXTRACT_TASK_RETRIES = 4

GRADIENT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("sq_norm_early", pa.list_(pa.float64())),
        ("sq_norm_late", pa.list_(pa.float64())),
        ("loss_early", pa.list_(pa.float64())),
        ("loss_late", pa.list_(pa.float64())),
        ("n_response_tokens", pa.int32()),
        ("n_tokens", pa.int32()),
        ("ifd_loss_cond", pa.float64()),
        ("ifd_loss_uncond", pa.float64()),
    ]
)


def adapter_name(member: int, checkpoint: str) -> str:
    return f"m{member}_{checkpoint}"


def adapter_locations(ensemble: Location, members: int, early: int, late: int) -> dict[str, Location]:
    """adapter name -> its folder under `ensemble/` (member m's early and late epochs)."""
    return {
        adapter_name(m, checkpoint): ensemble / f"member_{m}" / f"epoch_{epoch}"
        for m in range(members)
        for checkpoint, epoch in (("early", early), ("late", late))
    }


def _list_column(values: np.ndarray) -> pa.Array:
    """[N, M] float64 -> list<float64> column of N lists of M."""
    n, m = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float64()))


class NormExtractor:
    """Ray Data actor: canonical rows -> per-example squared LoRA gradient norms and losses for all 2M adapters."""

    def __init__(
        self,
        proxy: dict,
        gradients: dict,
        members: int,
        adapters: dict[str, Location],
        test_hook_dir: str | None = None,
    ) -> None:
        import torch

        from gradfilter_ray.ensemble.lora import load_adapters
        from gradfilter_ray.models import load_causal_lm, load_tokenizer, pick_device, resolve_dtype

        self.proxy: ProxyConfig = build(ProxyConfig, proxy, "proxy")
        self.cfg: GradientsConfig = build(GradientsConfig, gradients, "gradients")
        self.members = members
        self.device = pick_device(self.cfg.gpus_per_actor)
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.cpus_per_actor)))
        self.tokenizer = load_tokenizer(self.proxy.model)
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
        self._hook_dir = Path(test_hook_dir) if test_hook_dir else None
        self._calls = 0

    def _test_hook(self) -> None:
        self._calls += 1
        with (self._hook_dir / "calls.log").open("a") as fh:
            fh.write(f"{os.getpid()} {self._calls}\n")
        if self._calls == 2:
            deadline = time.monotonic() + HOOK_WAIT_S
            while not (self._hook_dir / "killed").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def __call__(self, table: pa.Table) -> pa.Table:
        from gradfilter_ray.data.tokenized import tokenize_table
        from gradfilter_ray.gradients.norms import per_example_sq_norms

        if self._hook_dir is not None:
            self._test_hook()
        tokens = tokenize_table(table, self.tokenizer, self.proxy)
        ifd_cond, ifd_uncond = self._base_losses(table, tokens)
        input_ids = tokens["input_ids"].to_numpy(zero_copy_only=False)
        starts = tokens["label_start"].to_numpy()
        lengths = np.array([len(x) for x in input_ids], dtype=np.int32)
        n, m = len(lengths), self.members
        results = {key: np.zeros((n, m)) for key in ("sq_norm_early", "sq_norm_late", "loss_early", "loss_late")}
        n_response = np.zeros(n, dtype=np.int32)
        for rows, batch in self._length_batches(input_ids, starts):
            for member in range(m):
                for checkpoint in ("early", "late"):
                    sq, loss, count = per_example_sq_norms(
                        self.model, **batch, adapter_name=adapter_name(member, checkpoint)
                    )
                    results[f"sq_norm_{checkpoint}"][rows, member] = sq.numpy()
                    results[f"loss_{checkpoint}"][rows, member] = loss.numpy()
                    n_response[rows] = count.numpy()
        return pa.Table.from_arrays(
            [
                tokens["id"],
                *(_list_column(results[k]) for k in list(results)),
                pa.array(n_response),
                pa.array(lengths),
                pa.array(ifd_cond),
                pa.array(ifd_uncond),
            ],
            schema=GRADIENT_SCHEMA,
        )

    def _length_batches(self, input_ids, starts: np.ndarray):
        """(row indices, device batch) over rows sorted by length, so batch-mates pad little."""
        from gradfilter_ray.data.prompt import collate_rows

        order = np.argsort([len(x) for x in input_ids], kind="stable")
        for begin in range(0, len(order), self.cfg.batch_size):
            rows = order[begin : begin + self.cfg.batch_size]
            batch = collate_rows([input_ids[i] for i in rows], starts[rows], self.tokenizer.pad_token_id)
            yield rows, {k: v.to(self.device) for k, v in batch.items()}

    def _base_losses(self, table: pa.Table, tokens: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Superfiltering's IFD inputs from the frozen base (adapters off): the response's mean token loss given
        the instruction, and of the response alone (NaN where no token is scored). Forward passes only."""
        import torch

        from gradfilter_ray.data.prompt import label_start, tokenize_response_only
        from gradfilter_ray.losses import per_example_losses, scored_window

        alone = tokenize_response_only(self.tokenizer, table["output"].to_pylist(), self.proxy.max_length)
        variants = {
            "cond": (tokens["input_ids"].to_numpy(zero_copy_only=False), tokens["label_start"].to_numpy()),
            "uncond": ([ex.input_ids for ex in alone], np.array([label_start(ex) for ex in alone])),
        }
        out = {}
        for key, (input_ids, starts) in variants.items():
            losses = np.zeros(len(starts))
            for rows, batch in self._length_batches(input_ids, starts):
                window = scored_window(batch["labels"])
                with torch.no_grad(), self.model.disable_adapter():
                    logits = self.model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window
                    ).logits
                    loss, count = per_example_losses(logits, batch["labels"][:, -window:])
                losses[rows] = np.where(count.cpu().numpy() > 0, loss.double().cpu().numpy(), np.nan)
            out[key] = losses
        return out["cond"], out["uncond"]


def check_exactly_once(input_ids: np.ndarray, output_ids: np.ndarray) -> None:
    """Every input id appears exactly once in the output (no loss, no duplication from retries)."""
    uniq, counts = np.unique(output_ids, return_counts=True)
    if (counts > 1).any():
        raise RuntimeError(f"{int((counts > 1).sum())} ids appear more than once in the gradients output")
    missing = np.setdiff1d(input_ids, uniq)
    extra = np.setdiff1d(uniq, input_ids)
    if len(missing) or len(extra):
        raise RuntimeError(f"gradients output lost {len(missing)} ids and invented {len(extra)}")


def audit_output(data: Location, out: Location) -> dict:
    """Check the written table holds every input id exactly once; its row and token counts."""
    import pyarrow.parquet as pq

    def read(where: Location, columns: list[str]):
        return pq.read_table(where.path, columns=columns, filesystem=where.filesystem)

    written = read(out, ["id", "n_tokens", "n_response_tokens"])
    check_exactly_once(read(data, ["id"])["id"].to_numpy(), written["id"].to_numpy())
    return {
        "rows": written.num_rows,
        "tokens": int(np.sum(written["n_tokens"].to_numpy())),
        "rows_no_response_tokens": int(np.sum(written["n_response_tokens"].to_numpy() == 0)),
    }


def run(cfg: Config, run: RunDir, key: str) -> dict:
    import ray.data

    ens, grads = cfg.ensemble, cfg.gradients
    adapters = adapter_locations(run.ensemble, ens.members, ens.early_epoch, ens.late_epoch)
    data = run.data
    ds = ray.data.read_parquet(
        data.path,
        filesystem=data.filesystem,
        columns=["id", "instruction", "input", "output"],
        **IO_REMOTE_ARGS,
    )
    gpu_args = {"num_gpus": grads.gpus_per_actor} if grads.gpus_per_actor > 0 else {}
    ds = ds.map_batches(
        NormExtractor,
        fn_constructor_kwargs={
            "proxy": asdict(cfg.proxy),
            "gradients": asdict(grads),
            "members": ens.members,
            "adapters": adapters,
            "test_hook_dir": os.environ.get(TEST_HOOK_ENV) or None,
        },
        batch_size=grads.length_bucket_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=grads.num_actors),
        num_cpus=grads.cpus_per_actor,
        max_restarts=-1,
        max_task_retries=EXTRACT_TASK_RETRIES,
        **gpu_args,
    )
    started = time.perf_counter()
    out = run.gradients
    ds.write_parquet(out.path, filesystem=out.filesystem, ray_remote_args=IO_REMOTE_ARGS)
    seconds = time.perf_counter() - started

    audit = run_as_task(audit_output, data, out)
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
