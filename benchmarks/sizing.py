"""The sizing table: accelerator-hours and devices for a corpus, from throughput measured by gpu_check.py.

    make gpu-check                                                    # on the GPU you will use
    python3 benchmarks/sizing.py --check benchmarks/results/gpu_check.json [--hours 4]

Writes benchmarks/results/sizing.{md,json}. Only measured numbers go in: the ensemble member loop's examples/s
and the extraction actor's examples/s on the checked device. The one scaling assumption, printed with the
table: extraction cost is linear in the number of adapters (2M: every adapter needs its own forward and
backward, since LoRA changes the activations), so a measurement with A adapters scales by 2M / A.

Below it, target fine-tuning and evaluation for the shipped configs (jobs/configs: Alpaca with LLaMA-2 7B and 13B,
the 1M-row template): the check's ~1B LLaMA measurement scaled by parameter count (benchmarks/sizing_target.py
states and prints its assumptions). A check without the target step gives the first table alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sizing_target import MEAN_TOKENS, SHIPPED, TargetMeasured, estimate, totals  # noqa: E402
from sizing_target import markdown as target_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Measured:
    device: str
    member_examples_per_s: float  # one ensemble member training alone on the device (rows x epochs / seconds)
    extract_examples_per_s: float  # extraction, every measured adapter per example
    extract_adapters: int
    bytes_per_token: float | None = None  # the norm kernel's peak above the resident model, per batch token
    device_memory_bytes: int | None = None

    @classmethod
    def from_check(cls, check: dict) -> Measured:
        members = check.get("ensemble") or []
        if not members or "extraction" not in check:
            raise ValueError("the check holds no ensemble or extraction throughput: re-run gpu_check.py")
        env = check.get("environment", {})
        return cls(
            device=env.get("gpu") or env.get("device", "?"),
            member_examples_per_s=sum(m["rows"] * m["epochs"] for m in members) / sum(m["seconds"] for m in members),
            extract_examples_per_s=check["extraction"]["examples_per_s"],
            extract_adapters=check["extraction"]["adapters"],
            bytes_per_token=(check.get("memory_per_token") or {}).get("bytes_per_token"),
            device_memory_bytes=env.get("gpu_memory_bytes"),
        )

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


def size_for(measured: Measured, examples: int, members: int, epochs: int, hours: float) -> Size:
    ensemble_s = members * epochs * examples / measured.member_examples_per_s
    extract_s = examples / measured.extract_examples_per_s * (2 * members / measured.extract_adapters)
    total_h = (ensemble_s + extract_s) / 3600
    return Size(examples, ensemble_s / 3600, extract_s / 3600, max(1, math.ceil(total_h / hours)))


def markdown(measured: Measured, sizes: list[Size], members: int, epochs: int, hours: float) -> str:
    lines = [
        f"Measured on {measured.device}: ensemble member {measured.member_examples_per_s:.1f} examples/s, "
        f"extraction {measured.extract_examples_per_s:.1f} examples/s with {measured.extract_adapters} adapters.",
        f"M = {members} members, {epochs} epochs, extraction over 2M = {2 * members} adapters (cost linear in "
        "adapters); target fine-tuning and evaluation are sized below, when the check measured them.",
        *(
            [
                f"Norm kernel memory {measured.bytes_per_token / 1024:.0f} KiB per batch token for the checked proxy "
                "(GPT-2 124M, bf16): with that proxy and one extraction actor per GPU, set "
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", default=str(RESULTS / "gpu_check.json"))
    ap.add_argument("--examples", type=int, nargs="+", default=[52_002, 1_000_000])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hours", type=float, default=4.0, help="wall-clock target for ensemble + extraction")
    ap.add_argument("--mean-tokens", type=float, default=MEAN_TOKENS, help="tokens per training row (target)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    check = json.loads(Path(args.check).read_text())
    measured = Measured.from_check(check)
    sizes = [size_for(measured, n, args.members, args.epochs, args.hours) for n in args.examples]
    target = TargetMeasured.from_check(check)
    estimates = (
        [e for name, rows in SHIPPED.items() for e in estimate(target, name, rows, args.mean_tokens)] if target else []
    )
    table = markdown(measured, sizes, args.members, args.epochs, args.hours)
    table += "\n" + target_markdown(target, estimates, args.mean_tokens)
    print(table, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sizing.md").write_text(table)
    result = {
        "measured": asdict(measured),
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
