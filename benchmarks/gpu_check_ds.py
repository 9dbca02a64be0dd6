"""DeepSpeed in one process for the GPU check: import it (from the carried `.gpu_carry/` on the GPU machine, which
has no DeepSpeed), refuse any JIT op build, and set up a world of one rank.

The GPU machine has nvcc and ninja, so an op that DeepSpeed decided to JIT-compile would build silently for minutes
of lent device time; the check fails fast instead, naming the op. The finetune stage uses torch's AdamW and no
offload, so no op is needed anywhere on its path."""

from __future__ import annotations

import os
import socket
import warnings

import torch

CARRY_HINT = "run `make gpu-carry` here and pass carry=['.gpu_carry'] (gpu_check.py puts it on sys.path itself)"


class JitBuildRefused(RuntimeError):
    pass


def import_deepspeed(device: torch.device):
    if device.type == "cpu":
        # Chosen before the import: DeepSpeed otherwise warns that it fell back to CPU (as the finetune worker does).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"DeepSpeed is not importable ({e}): {CARRY_HINT}") from e
    from deepspeed.ops.op_builder.builder import OpBuilder

    def refuse(self, verbose=True):
        raise JitBuildRefused(f"DeepSpeed tried to JIT-compile the op {self.name!r}: the check allows no op build")

    OpBuilder.jit_load = refuse
    # ZeRO-3 calls these torch collectives on every step: one deprecation line each would bury the check's output.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if device.type == "cpu":
        # The CPU accelerator would otherwise build a shared-memory allreduce op that gloo never uses (as the worker
        # does). Not on CUDA: reading __compatible_ops__ probes every CUDA op builder there, for nothing.
        getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    return deepspeed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(deepspeed, device: torch.device) -> None:
    """torch.distributed with world size 1, as a Ray Train worker of a one-GPU trainer would have it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    os.environ.update({**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
