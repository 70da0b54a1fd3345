"""README's install and test commands are exactly what CI runs (so a missing install step fails CI), every
command in its code blocks parses, its results table is the one results.json gives, and its Python runs."""

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
    assert install.endswith(' -c constraints.txt') and (ROOT / "constraints.txt").is_file()  # the locked set
    assert ".venv/bin/python .ci/lock.py --check" in ci
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


class _Parsed(Exception):
    """Raised right after the Lightning parser accepted a command line: nothing is instantiated or trained."""


def readme_fusion_zoo_commands() -> list[list[str]]:
    """Every ``fusion-zoo ...`` line of README's bash blocks as argv (without ``fusion-zoo``)."""
    import shlex

    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line.startswith(".venv/bin/"):
                line = line[len(".venv/bin/"):]
            if line.startswith("fusion-zoo "):
                out.append(shlex.split(line)[1:])
    return out


def parse_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse ``fusion-zoo ARGV`` with the command's own parser, running nothing: an unknown command, a renamed flag
    or a bad value raises (ConfigError, or AssertionError carrying the parser's message)."""
    import contextlib
    import io

    from recipes import cli

    command, rest = argv[0], argv[1:]
    listed = re.findall(r"^  (\w+) ", cli.USAGE.split("options:")[0], re.M)
    assert command in listed, f"`fusion-zoo {command}` is not a command listed by `fusion-zoo --help`"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if command in cli.LIGHTNING_COMMANDS:
                from recipes import fit_cli

                def parse_then_stop(self, parser, args):  # the real parse, then no instantiation or run
                    original(self, parser, args)
                    raise _Parsed

                original = fit_cli.FusionCLI.parse_arguments
                monkeypatch.setattr(fit_cli.FusionCLI, "parse_arguments", parse_then_stop)
                with pytest.raises(_Parsed):
                    fit_cli.run_lightning(argv)
            elif command in cli.ZOO_COMMANDS:
                from zoo.cli import build_parser

                build_parser().parse_args(argv)
            elif command == "sweep":
                from recipes.sweep.run import parse_args

                parse_args(rest)
            elif command in cli.MODULAR_COMMANDS:
                from recipes.modular_cli import _parser

                _parser(command).parse_args(rest)
            else:
                raise AssertionError(f"README runs `fusion-zoo {command}`, which is not a command")
    except SystemExit as e:  # argparse / jsonargparse refused the line
        message = err.getvalue()
        message = " ".join(message[message.find("error:"):].split())[:300]
        raise AssertionError(f"`fusion-zoo {' '.join(argv)}` does not parse: {message}") from e


def test_every_readme_command_exists_and_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each README command line goes through its command's real parser (no training, no loading)."""
    monkeypatch.chdir(tmp_path)  # fit makes its runs/ folder here
    commands = readme_fusion_zoo_commands()
    assert {c[0] for c in commands} >= {"fit", "predict", "zoo", "sweep", "serve"}
    for argv in commands:
        parse_command(argv, monkeypatch)


@pytest.mark.parametrize("line", ["fit --model.fusion_hed gating", "fit --trainer.max_epochs many",
                                  "predict --model m --tabel t.csv", "zoo lst", "sweep --headz concat",
                                  "serve --model m --prot 1", "train --data.data_dir x"])
def test_the_command_check_fails_on_a_renamed_flag_or_command(line: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fusion_errors import FusionZooError

    monkeypatch.chdir(tmp_path)
    with pytest.raises((AssertionError, FusionZooError)):
        parse_command(line.split(), monkeypatch)


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
