"""The results file's verdicts and the printed report of bench_extract."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import pyarrow as pa

from extraction.common import MEMBERS, NORM_RTOL, RAY_RTOL, TARGETS, log

# ---------------------------------------------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine_info(threads: int) -> dict:
    import peft
    import ray
    import torch
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def fail(results: dict, out_file: Path, what: str, detail: dict) -> None:
    results["status"] = f"correctness check failed: {what}"
    out_file.write_text(json.dumps(results, indent=2, default=str))
    log(f"CORRECTNESS FAILURE ({what}): {json.dumps(detail)}")
    log(f"no speeds reported; details in {out_file}")
    sys.exit(2)


def verdict(ok_wall: bool, ok_cpu: bool) -> str:
    if ok_wall and ok_cpu:
        return "met"
    if ok_wall or ok_cpu:
        return "met on " + ("wall" if ok_wall else "CPU") + " time only"
    return "MISSED"


def timing_rows(timings: dict[str, dict], n: int) -> None:
    log(f"  {'measurement':<26}{'wall s':>9}{'CPU s':>9}{'ms/example':>12}   wall runs")
    for name, tm in timings.items():
        runs = " ".join(f"{w:.2f}" for w in tm["wall_runs_s"])
        log(f"  {name:<26}{tm['wall_s']:>9.3f}{tm['cpu_s']:>9.3f}{1000 * tm['wall_s'] / n:>12.2f}   {runs}")


def print_report(res: dict) -> None:
    t = TARGETS
    log("")
    log("=" * 110)
    for key in ("ab_real", "ab_small"):
        ab = res[key]
        err = max(ab["correctness"]["max_rel_err"].values())
        window = "; kernel, floor and timed loop skip the prompt's logits" if ab["prompt_logits_skipped"] else ""
        log(
            f"(a/b) {ab['label']}: {ab['n_examples']} rows, {ab['mean_tokens_per_row']:.1f} tokens/row, "
            f"max rel err vs the bs1 reference {err:.1e} (<= {NORM_RTOL:g}){window}"
        )
        timing_rows(ab["timings"], ab["n_examples"])
        if key == "ab_small":
            multi = res["multi_adapter"]
            timing_rows(multi["timings"], multi["n_examples"] * multi["adapters"])
        heads = ab["lm_head_positions"]
        log(
            "  LM-head positions: "
            + ", ".join(f"{k} {v}" for k, v in heads.items())
            + f" ({heads['b16'] / heads['bs1']:.2f}x at b16 vs bs1)"
        )
        for bs, r in ab["ratios"].items():
            log(
                f"  {bs}: speedup vs bs1 {r['speedup_vs_bs1_wall']:.2f}x (CPU {r['speedup_vs_bs1_cpu']:.2f}x), "
                f"overhead vs floor {r['overhead_vs_floor_wall']:.3f}x (CPU {r['overhead_vs_floor_cpu']:.3f}x)"
            )
        if key == "ab_small":
            r = res["multi_adapter"]["ratios"]
            log(
                f"  with all {res['multi_adapter']['adapters']} adapters loaded (the stage's setting): overhead vs "
                f"floor {r['overhead_vs_floor_wall']:.3f}x (CPU {r['overhead_vs_floor_cpu']:.3f}x)"
            )
    c = res["ray"]
    log(
        f"(c) Ray Data stage vs bare loop: {c['rows']} rows x {2 * MEMBERS} adapters, batch {c['batch_size']}; "
        f"outputs agree: max rel diff {c['correctness']['max_rel_diff']:.1e} (<= {RAY_RTOL:g})"
    )
    log(f"  {'measurement':<26}{'wall s':>9}{'CPU s':>9}   wall runs")
    for name, tm in (("ray.init (start-up)", c["startup"]), ("Ray stage", c["ray_stage"]), ("bare loop", c["bare"])):
        runs = " ".join(f"{w:.2f}" for w in tm.get("wall_runs_s", []))
        log(f"  {name:<26}{tm['wall_s']:>9.3f}{tm['cpu_s']:>9.3f}   {runs}")
    r = c["ratios"]
    log(
        f"  ray_efficiency = (start-up + stage) / bare: {r['ray_efficiency_wall']:.2f} (CPU "
        f"{r['ray_efficiency_cpu']:.2f}); (ray_time - start-up) / bare: {r['ray_minus_startup_over_bare_wall']:.2f} "
        f"(CPU {r['ray_minus_startup_over_bare_cpu']:.2f}), target <= {t['ray']}"
    )
    log(
        "  Ray's CPU s by process (first run; new processes): "
        + ", ".join(f"{k} {v['cpu_s']} ({v['new_processes']})" for k, v in c["ray_cpu_by_process_s"].items())
    )
    if "phases" in c:
        ph = c["phases"]
        log(
            f"  Ray stage phases (median): first batch reaches the actor after {ph['until_first_batch_s']:.1f} s "
            f"(actor construction {ph['actor_init_wall_s']:.1f} s wall, {ph['actor_init_cpu_s']:.1f} s CPU, "
            f"incl. imports); then {ph['after_first_batch_s']:.1f} s to the end, of which "
            f"{ph['udf_wall_s']:.1f} s wall / {ph['udf_cpu_s']:.1f} s CPU in the UDF"
        )
        log(
            f"  UDF time / bare loop: wall {r['udf_over_bare_wall']:.2f}, CPU {r['udf_over_bare_cpu']:.2f}; "
            f"(stage after first batch) / bare: {r['after_first_batch_over_bare_wall']:.2f}"
        )
    s = res["scaling"]
    log(f"(s) scaling: bare ShardExtractor loop, {2 * MEMBERS} adapters, batch {s['batch_size']}, a process per size")
    log(
        f"  {'rows':>8}{'wall s':>9}{'CPU s':>9}{'ex/s wall':>11}{'ex/s CPU':>10}{'tok/row':>9}"
        f"{'RSS setup MiB':>15}{'peak RSS MiB':>14}"
    )
    for n, z in s["sizes"].items():
        log(
            f"  {n:>8}{z['wall_s']:>9.1f}{z['cpu_s']:>9.1f}{z['examples_per_s_wall']:>11.1f}"
            f"{z['examples_per_s_cpu']:>10.1f}{z['mean_tokens_per_row']:>9.1f}{z['rss_setup_kib'] / 1024:>15.1f}"
            f"{z['peak_rss_kib'] / 1024:>14.1f}"
        )
    for n, z in s["sizes"].items():
        trace = z.get("rss_trace_mib") or []
        picks = (
            [trace[i] for i in sorted({int(f * (len(trace) - 1)) for f in (0, 0.25, 0.5, 0.75, 1)})] if trace else []
        )
        log(f"  RSS over the {n}-row run (rows: MiB): " + ", ".join(f"{r}: {m}" for r, m in picks))
    r = s["ratios"]
    log(
        f"  scaling_ratio {r['scaling_ratio_wall']:.3f} (CPU {r['scaling_ratio_cpu']:.3f}), peak RSS ratio "
        f"{r['peak_rss_ratio']:.3f}"
    )
    log("targets (wall time; CPU time in brackets):")
    for name, v in res["targets"].items():
        log(f"  {name:<9} {v['verdict']:<24} {v['value']:<22} {v['rule']}")
    if "phases" in c:
        v = c["ratios"]["after_first_batch_over_bare_wall"]
        log(
            f"  (ray, reading start-up as everything before the first batch reaches the actor: {v:.3f} x bare, "
            f"{'met' if v <= t['ray'] else 'MISSED'})"
        )
    log("notes:")
    for note in res["notes"]:
        log(f"  - {note}")
    mach = res["machine"]
    log(
        f"total run time {res['total_wall_s']:.0f} s wall; load average {mach['loadavg_start'][0]:.1f} at start, "
        f"{mach['loadavg_end'][0]:.1f} at end, on {mach['nproc']} CPUs"
    )
    log("=" * 110)


def evaluate(res: dict) -> dict:
    t = TARGETS
    bs = f"b{res['ab_real']['summary_batch_size']}"
    ab = res["ab_real"]["ratios"][bs]
    ray_r = res["ray"]["ratios"]
    sc = res["scaling"]["ratios"]
    rss_ok = sc["peak_rss_ratio"] <= 1 + t["rss_tol"]
    checks = {
        "speedup": (
            ab["speedup_vs_bs1_wall"],
            ab["speedup_vs_bs1_cpu"],
            lambda v: v >= t["speedup"],
            f"norms_speedup_vs_bs1 >= {t['speedup']} (real vocab, batch {bs[1:]})",
        ),
        "overhead": (
            ab["overhead_vs_floor_wall"],
            ab["overhead_vs_floor_cpu"],
            lambda v: v <= t["overhead"],
            f"overhead_vs_floor <= {t['overhead']} (real vocab, batch {bs[1:]})",
        ),
        "ray": (
            ray_r["ray_minus_startup_over_bare_wall"],
            ray_r["ray_minus_startup_over_bare_cpu"],
            lambda v: v <= t["ray"],
            f"ray_time - start-up <= {t['ray']} x bare",
        ),
        "scaling": (
            sc["scaling_ratio_wall"],
            sc["scaling_ratio_cpu"],
            lambda v: abs(v - 1) <= t["scaling_tol"] and rss_ok,
            f"examples/s ratio in 1 +- {t['scaling_tol']}, peak RSS ratio {sc['peak_rss_ratio']:.3f} <= "
            f"{1 + t['rss_tol']}",
        ),
    }
    out = {}
    for name, (wall, cpu, rule_fn, rule) in checks.items():
        ok_w, ok_c = bool(rule_fn(wall)), bool(rule_fn(cpu))
        out[name] = {
            "wall": ok_w,
            "cpu": ok_c,
            "value_wall": wall,
            "value_cpu": cpu,
            "value": f"{wall:.3f} [{cpu:.3f}]",
            "verdict": verdict(ok_w, ok_c),
            "rule": rule,
        }
    return out
