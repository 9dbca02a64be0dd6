"""Every config field declares how it keys outputs (beside its doc text), and the keys follow the declarations:
a RUN field (width, placement, retries, timeouts, concurrency, logging, checkpointing) re-keys no stage, a RESOLVED
field keys through what it resolves to, and a new field without a declaration fails here."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from gradfilter_ray import pipeline
from gradfilter_ray.config import (
    KEY_CLASSES,
    RESOLVED,
    RESOLVED_VALUES,
    RUN,
    Config,
    ConfigError,
    doc,
    key_class,
    keyed_value,
    load,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"


def leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type) of every non-section field, recursively."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += leaves(tp, f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", f, tp))
    return found


def unclassified(cls: type) -> list[str]:
    return [name for name, f, _ in leaves(cls) if f.metadata.get("keys") not in KEY_CLASSES]


def test_every_field_declares_how_it_keys_outputs():
    assert unclassified(Config) == []
    assert len(leaves()) > 100


def test_a_field_without_a_declaration_is_caught():
    @dataclass(frozen=True)
    class WithNewField:
        old: int = doc("declared", 1, keys=RUN)
        new: int = doc("forgot to say", 2)

    assert unclassified(WithNewField) == ["new"]


def test_resolved_fields_and_their_resolvers_match():
    declared = {name for name, f, _ in leaves() if f.metadata["keys"] == RESOLVED}
    assert declared == set(RESOLVED_VALUES)


def cfg(tmp_path, *extra: str) -> Config:
    return load(TINY, [f"output_dir={tmp_path / 'run'}", "ensemble.members=2", *extra])


def keys(c: Config) -> dict[str, str]:
    return {name: pipeline.stage_key(name, c) for name in pipeline.STAGES}


def other_value(value: Any, tp: Any) -> list[Any]:
    """Valid-looking values other than `value` for a field of type `tp` (the config may still refuse some)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return [a for a in args if a != value]
    if origin in (typing.Union, types.UnionType):
        return [v for a in args if a is not type(None) for v in other_value(value, a)] + (
            [None] if type(None) in args and value is not None else []
        )
    if tp is bool:
        return [not value]
    if tp is int:
        return [(value or 0) + 1, (value or 0) + 2]
    if tp is float:
        return [(value or 0.0) + 0.5, (value or 0.0) * 0.5 + 0.25]
    if tp is str:
        return ["other-value"]
    return []


# Explicit dtypes: with `auto`, a GPU count (RUN) changes the dtype the precision resolves to, which keys (below).
EXPLICIT_DTYPES = ("ensemble.precision=float32", "gradients.precision=float32")


def test_no_run_field_rekeys_any_stage(tmp_path):
    base = cfg(tmp_path, *EXPLICIT_DTYPES)
    base_keys = keys(base)
    tried = []
    for name, f, tp in leaves():
        if f.metadata["keys"] != RUN or name == "output_dir":
            continue
        current: Any = base
        for part in name.split("."):
            current = getattr(current, part)
        for value in other_value(current, tp):
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            try:
                changed = cfg(tmp_path, *EXPLICIT_DTYPES, f"{name}={text}")
            except ConfigError:
                continue  # refused by a cross-field check: another value may pass
            assert keys(changed) == base_keys, name
            tried.append(name)
            break
    # nearly every RUN field was changed at least once (a few only take values the tiny config refuses)
    run_fields = [n for n, f, _ in leaves() if f.metadata["keys"] == RUN and n != "output_dir"]
    assert len(set(tried)) >= len(run_fields) - 3, sorted(set(run_fields) - set(tried))


def test_a_device_keys_through_the_dtype_it_resolves_precision_to(tmp_path):
    auto = keys(cfg(tmp_path, "ensemble.precision=auto"))
    assert (
        keys(cfg(tmp_path, "ensemble.precision=auto", "ensemble.gpus_per_member=0.5"))["ensemble"] != auto["ensemble"]
    )
    fp32 = keys(cfg(tmp_path, "ensemble.precision=float32"))
    assert fp32 == auto  # auto is float32 on CPU
    assert keys(cfg(tmp_path, "ensemble.precision=float32", "ensemble.gpus_per_member=0.5")) == fp32
    assert (
        keys(cfg(tmp_path, "gradients.precision=auto", "gradients.gpus_per_actor=1"))["gradients"] != fp32["gradients"]
    )
    assert keys(cfg(tmp_path, "gradients.precision=float32", "gradients.gpus_per_actor=1")) == fp32
    # in bf16 the head's dtype is a choice that changes the norms; in float32 it is a no-op
    bf16 = cfg(tmp_path, "gradients.precision=bfloat16")
    assert pipeline.stage_key(
        "gradients", cfg(tmp_path, "gradients.precision=bfloat16", "gradients.head_precision=model")
    ) != (pipeline.stage_key("gradients", bf16))


def test_a_worker_count_keys_through_the_rows_per_optimiser_step(tmp_path):
    def finetune(*extra: str) -> Any:
        return keyed_value(
            cfg(tmp_path, "finetune.effective_batch_size=8", "finetune.micro_batch_size=4", *extra), "finetune"
        )

    # 1 worker x 2 accumulation = 2 workers x 1 = 8 rows a step: the same micro-batches, the same training
    assert finetune("finetune.num_workers=1") == finetune("finetune.num_workers=2")
    assert finetune("finetune.num_workers=4") != finetune("finetune.num_workers=2")  # 16 rows a step
    assert finetune("finetune.gpus_per_worker=1") != finetune("finetune.gpus_per_worker=0")  # bf16 on GPUs


def test_key_class_reads_the_declaration():
    assert key_class("evaluation.judge.timeout_s") == RUN
    assert key_class("evaluation.judge") is None  # a section
