"""README's install and test commands are exactly what CI runs (so a missing install step fails CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md lost its Quick start bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_readme_install_and_test_commands() -> None:
    install, main_job, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert main_job.startswith(".venv/bin/fusion-zoo ")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_results_table_is_the_one_results_json_gives() -> None:
    import json
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_table

    current = readme_table.block((ROOT / "README.md").read_text())
    assert current is not None, "README.md lost its results block"
    assert current == readme_table.render(json.loads((ROOT / "benchmarks" / "results.json").read_text())), \
        "README's results table is stale: run python benchmarks/readme_table.py"


def test_every_readme_command_exists_and_its_flags_parse() -> None:
    import shlex

    from pytorch_lightning import Trainer
    from pytorch_lightning.callbacks import EarlyStopping

    from recipes import cli
    from recipes.data import FusionDataModule
    from recipes.task import FusionTask

    groups = {"model": FusionTask, "data": FusionDataModule, "trainer": Trainer, "checkpoint": cli.FusionCheckpoint,
              "early_stopping": EarlyStopping}
    known = {*cli.LIGHTNING_COMMANDS, *cli.ZOO_COMMANDS, "sweep"}
    seen = 0
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(".venv/bin/"):
                line = line[len(".venv/bin/"):]
            if not line.startswith("fusion-zoo "):
                continue
            argv = shlex.split(line)[1:]
            assert argv[0] in known, f"README runs `fusion-zoo {argv[0]}`, which is not a command"
            assert argv[0] in cli.USAGE, f"`fusion-zoo {argv[0]}` is missing from `fusion-zoo --help`"
            if argv[0] in cli.LIGHTNING_COMMANDS:
                cli.check_flag_names(argv[1:], groups)  # a flag a class does not take raises
            seen += 1
    assert seen >= 8


def test_readme_python_examples_compile_and_import() -> None:
    import ast
    import importlib

    for block in _blocks("python"):
        ast.parse(block)  # a syntax error fails here
        for line in block.splitlines():
            m = re.match(r"from (\S+) import (.+)|import (\S+)", line)
            if m and m.group(1):
                module = importlib.import_module(m.group(1))
                for name in m.group(2).split(","):
                    assert hasattr(module, name.strip()), f"README imports {name.strip()} from {m.group(1)}"
            elif m:
                importlib.import_module(m.group(3))


@pytest.mark.slow
def test_readme_python_training_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, run as written (fewer epochs) on a small folder of its own: data module from a
    folder, task from the data, a Trainer, save, load, predict (issue 28, item 5)."""
    from PIL import Image

    folder = tmp_path / "my_folder"
    (folder / "images").mkdir(parents=True)
    colours = {"red": (220, 40, 40), "blue": (40, 40, 220)}
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        rows = ["image,text,label"]
        for i in range(n):
            label = ("red", "blue")[i % 2]
            name = f"images/{split}-{i}.png" if split != "train" or i else "images/0.png"
            Image.new("RGB", (32, 32), colours[label]).save(folder / name)
            rows.append(f"{name},is the shape red?,{label}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSION_ZOO_CACHE", str(tmp_path / "cache"))
    [block] = [b for b in _blocks("python") if "FusionTask.for_data" in b]
    code = block.replace("max_epochs=40", "max_epochs=2, enable_progress_bar=False, logger=False, "
                                          "enable_checkpointing=False")
    assert code != block
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
