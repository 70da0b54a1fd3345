"""Loading never runs pickled code: every torch.load passes weights_only=True, fused weights are safetensors,
and configs are validated (naming the key) before anything is built."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fusion_errors import CheckpointError, ConfigError
from zoo.config import FusionModelConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("encoders", "fusion_heads", "recipes", "zoo", "benchmarks")


def _python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def _calls(tree: ast.AST, module: str, func: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == func and isinstance(n.func.value, ast.Name) and n.func.value.id == module]


def test_every_torch_load_is_weights_only() -> None:
    files = _python_files()
    assert len(files) > 20
    found, unsafe = 0, []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            found += 1
            flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(f"{path.relative_to(ROOT)}:{call.lineno}")
        assert not _calls(tree, "pickle", "load") and not _calls(tree, "pickle", "loads"), path
    assert found >= 2  # the checker sees the real call sites
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


def test_the_checker_catches_an_unsafe_call() -> None:
    tree = ast.parse("import torch\ntorch.load('x.ckpt')\ntorch.load('y', weights_only=True)\n")
    calls = _calls(tree, "torch", "load")
    assert [any(k.arg == "weights_only" for k in c.keywords) for c in calls] == [False, True]


def test_fused_weights_are_read_with_safetensors_only() -> None:
    hub = (ROOT / "zoo/checkpoint.py").read_text()
    assert "safetensors" in hub and "load_file" in hub
    assert not _calls(ast.parse(hub), "torch", "load")


def test_a_pickle_ckpt_with_code_is_refused(tmp_path: Path) -> None:
    import pickle

    from recipes.task import FusionTask

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(CheckpointError, match="not a readable Lightning checkpoint"):
        FusionTask.from_checkpoint(path)


@pytest.mark.parametrize(("change", "needle"), [({"hidden_dim": "wide"}, "config.hidden_dim"),
                                                 ({"hiden_dim": 8}, "hiden_dim"),
                                                 ({"format_version": 99}, "format_version")])
def test_config_is_validated_before_build(change: dict, needle: str) -> None:
    data = {"encoders": {"text": "tiny-text"}, "labels": ["a", "b"], **change}
    with pytest.raises(ConfigError, match=needle):
        FusionModelConfig.from_json(json.dumps(data))
