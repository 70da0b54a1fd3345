"""The benchmark runner records which CPU each step ran on: the same code's ratios differ between hosts."""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
run = importlib.import_module("benchmarks.run")


def test_cpu_model_reads_the_model_name_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    assert run.cpu_model(info) == "AMD EPYC 9R14 96-Core Processor"


def test_cpu_model_falls_back_to_the_platform_without_cpuinfo(tmp_path: Path) -> None:
    assert run.cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())
    (tmp_path / "no-model").write_text("processor\t: 0\n")
    assert run.cpu_model(tmp_path / "no-model") == (platform.processor() or platform.machine())
