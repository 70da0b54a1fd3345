"""Performance benchmarks of fusion-zoo on CPU: ``python benchmarks/run.py [--skip-main-job]``.

Writes benchmarks/results.json (each measured key, its target and ``met``) and benchmarks/report.md.
Definitions and how to read the numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.measure import (  # noqa: E402
    FIT_PEAK_CODE,
    cache_encode_speedup,
    cached_step_overhead,
    cli_startup_seconds,
    head_step_share,
    inference_fusion,
    partial_finetune_overhead,
    pipeline_headroom,
    sweep_cache_speedup,
)
from benchmarks.scale import ddp_encode_share, scale_rss, warm_rowcheck  # noqa: E402
from benchmarks.serve_load import TARGETS as SERVE_TARGETS  # noqa: E402
from benchmarks.serve_load import measure as serve_load  # noqa: E402

TARGETS: dict[str, tuple[str, float]] = {
    "sweep_cache_speedup": (">=", 30.0),
    "head_step_share": ("<=", 0.03),
    "main_job_seconds": ("<=", 180.0),
    "main_job_peak_mb": ("<", 4096.0),
    "inference_fused_speedup": (">=", 1.3),
    "inference_max_abs_diff": ("<=", 1e-4),
    "pipeline_headroom": (">=", 3.0),
    "partial_finetune_overhead": ("<=", 1.5),
    "cache_encode_speedup": (">=", 2.5),
    "cached_step_overhead": ("<=", 1.5),
    "cli_startup_seconds": ("<=", 3.0),
    # issue 31: what grows with the table (benchmarks/scale.py); optional steps, run with --only
    "scale_rss_mb_per_100k_rows": ("<=", 100.0),
    "scale_rss_mb_per_100k_rows_tokens": ("<=", 300.0),
    "scale_warm_rowcheck_seconds_per_100k": ("<=", 2.0),
    "ddp_encode_share": ("<=", 0.55),
    # a streamed table (--data.streaming) holds a shuffle buffer and a batch per worker, whatever its length
    "scale_rss_mb_per_100k_rows_stream": ("<=", 25.0),
}
# steps that run only when --only names them (minutes each); their keys keep their previous values otherwise
OPTIONAL_STEPS = {"scale_pooled": ("scale_rss_mb_per_100k_rows",),
                  "scale_tokens": ("scale_rss_mb_per_100k_rows_tokens",),
                  "scale_rowcheck": ("scale_warm_rowcheck_seconds_per_100k",),
                  "ddp_encode": ("ddp_encode_share",),
                  "scale_stream": ("scale_rss_mb_per_100k_rows_stream",)}
TARGETS.update(SERVE_TARGETS)


def _met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[key]
    return {">=": value >= target, "<=": value <= target, "<": value < target}[op]




def _peak_mb(proc: subprocess.CompletedProcess) -> float:
    """The job's own peak RSS (VmHWM) in MB; falls back to ru_maxrss of the children where /proc is absent."""
    for line in proc.stderr.splitlines()[::-1]:
        if line.startswith("FUSION_ZOO_PEAK_KB"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # KiB on Linux


def _fit(cwd: str, cache: str, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-c", FIT_PEAK_CODE]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FUSION_ZOO_CACHE": cache}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc


def main_job(timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``fusion-zoo fit`` (the README main job, all defaults) in a subprocess in a scratch folder, first with
    an empty feature cache (what a new user waits for: encoding included), then again with the cache warm.

    Peak memory is the job's own VmHWM (peak resident set), reported by the job process itself.
    """
    with tempfile.TemporaryDirectory(prefix="fz-main-job-") as tmp:
        cache = str(Path(tmp) / "feature-cache")
        cold_s, proc = _fit(tmp, cache, timeout)
        peak_mb = _peak_mb(proc)
        tail = (proc.stdout + proc.stderr)[-2000:]
        if proc.returncode != 0:
            return {"main_job_seconds": None, "main_job_peak_mb": None, "main_job_error": tail}
        warm_s, warm = _fit(tmp, cache, timeout)
    return {"main_job_seconds": cold_s, "main_job_peak_mb": peak_mb, "warm_cache_seconds":
            warm_s if warm.returncode == 0 else None, "cold_run_tail": tail[-600:]}


def _fmt(v: Any) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
    return str(v)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``): the same code's ratios
    differ between hosts (docs/benchmarks.md), so every step's details record where it ran."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(results: dict[str, Any], path: Path) -> None:
    lines = ["# fusion-zoo benchmarks", "", f"Machine: {results['machine']}. Run: `{results['command']}`. "
             "Definitions: docs/benchmarks.md.", "", "| key | measured | target | met |", "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        met = results["met"][key]
        lines.append(f"| {key} | {_fmt(results.get(key))} | {op} {target:g} | "
                     f"{'yes' if met else ('**no (missed)**' if met is False else 'skipped')} |")
    lines += ["", "## Details", "", "```json", json.dumps(results["details"], indent=2, default=str), "```", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-main-job", action="store_true", help="skip the slow `fusion-zoo fit` measurement")
    p.add_argument("--only", default=None,
                   help="comma-separated steps to run (sweep_cache_speedup, head_step_share, inference, "
                        "pipeline_headroom, partial_finetune, serve_load, cache_encode, cached_step, cli_startup, "
                        "main_job; optional, only when named here: scale_pooled, scale_tokens, scale_rowcheck, "
                        "scale_stream, ddp_encode); the keys of the others keep their values from the previous "
                        "results.json")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for results.json/report.md")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the in-process measurements (default: torch's); 1 gives stable "
                        "ratios on a machine shared with other jobs (the main job subprocess keeps its default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    details: dict[str, Any] = {}
    results: dict[str, Any] = {}
    steps = [("sweep_cache_speedup", sweep_cache_speedup), ("head_step_share", head_step_share),
             ("inference", inference_fusion), ("pipeline_headroom", pipeline_headroom),
             ("partial_finetune", partial_finetune_overhead), ("serve_load", serve_load),
             ("cache_encode", cache_encode_speedup), ("cached_step", cached_step_overhead),
             ("cli_startup", cli_startup_seconds), ("scale_pooled", scale_rss),
             ("scale_tokens", lambda: scale_rss(tokens=True)), ("scale_rowcheck", warm_rowcheck),
             ("ddp_encode", ddp_encode_share), ("scale_stream", lambda: scale_rss(stream=True))]
    only = set(args.only.split(",")) if args.only else None
    if only is not None and (unknown := only - {name for name, _ in steps} - {"main_job"}):
        p.error(f"--only: unknown steps {sorted(unknown)}")
    for name, fn in steps:
        if (only is not None and name not in only) or (only is None and name in OPTIONAL_STEPS):
            continue
        t = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        out = fn()
        details[name] = {**{k: v for k, v in out.items() if k not in TARGETS},
                         "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_model()}
        results |= {k: v for k, v in out.items() if k in TARGETS}
        print(f"[bench] {name}: {({k: v for k, v in out.items() if k in TARGETS})} "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    if args.skip_main_job or (only is not None and "main_job" not in only):
        results |= {"main_job_seconds": None, "main_job_peak_mb": None}
    else:
        print("[bench] main job (fusion-zoo fit) ...", flush=True)
        out = main_job()
        details["main_job"] = {**{k: v for k, v in out.items() if k not in TARGETS},
                               "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_model()}
        results |= {k: v for k, v in out.items() if k in TARGETS}
        print(f"[bench] main job: {out.get('main_job_seconds')} s, {out.get('main_job_peak_mb')} MB", flush=True)
    out_dir = Path(args.out)
    previous_file = out_dir / "results.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    # keys measured by their own scripts (benchmarks/easyvqa.py) are kept, not blanked, by a rerun of this one
    kept = {k: v for k, v in previous.items() if k not in TARGETS and k not in ("targets", "met")}
    kept_targets = {k: v for k, v in previous.get("targets", {}).items() if k not in TARGETS}
    kept_met = {k: v for k, v in previous.get("met", {}).items() if k not in TARGETS}
    if only is not None:  # steps not run this time keep their previous values
        results = {k: v for k, v in results.items() if v is not None}
        kept |= {k: v for k, v in previous.items() if k in TARGETS and k not in results}
    optional = {k for keys in OPTIONAL_STEPS.values() for k in keys}
    kept |= {k: v for k, v in previous.items() if k in optional and k not in results}
    # each step's details (setup, per-setting times, load) stay beside the figures; a rerun replaces its own
    kept["details"] = {**previous.get("details", {}), **details}
    for key in [k for k in kept if k.endswith("_details") and k[:-len("_details")] in results]:
        del kept[key]  # an older layout's details of a figure measured again now
    final = {**kept, **{key: results.get(key, kept.get(key)) for key in TARGETS}}
    final["targets"] = {**kept_targets, **{k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()}}
    final["met"] = {**kept_met, **{k: _met(k, final[k]) for k in TARGETS}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(final, indent=2, default=str) + "\n")
    machine = (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, load average before the run {load_before}")
    command = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    write_report({**final, "machine": machine, "command": command}, out_dir / "report.md")  # details: all steps
    missed = [k for k, v in final["met"].items() if v is False]
    print(f"[bench] wrote {out_dir / 'results.json'}; missed targets: {missed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
