"""Issue 14 (2, 5): a checkpoint folder is untrusted input. It cannot make the loader run code (transformers
``auto_map`` custom code is refused, never prompted for), read a file outside the folder (absolute paths, ``..``,
symlinks, paths relative to the working folder) without ``allow_external_paths=True``, load an unverified encoder,
or demand gigabytes before a size check."""

from __future__ import annotations

import ast
import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_errors import CheckpointError, ConfigError
from zoo import checkpoint
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

ROOT = Path(__file__).resolve().parents[2]
EVIL_CONFIG = {"model_type": "evil", "hidden_size": 8,
               "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}
EVIL_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('pwned')\n"


def _evil_folder(path: Path) -> Path:
    """A transformers model folder whose config asks to run its own evil.py (which leaves a RAN marker)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(EVIL_CONFIG))
    (path / "evil.py").write_text(EVIL_CODE)
    return path


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    cfg = FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8)
    torch.manual_seed(0)
    return FusionModel(cfg).save_pretrained(tmp_path / "ck")


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> str:
        raise AssertionError("the loader prompted the user")

    monkeypatch.setattr(builtins, "input", refuse)


def _edit(folder: Path, **text_spec: Any) -> None:
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["encoders"]["text"] = {**doc["model"]["encoders"]["text"], **text_spec}
    (folder / "config.json").write_text(json.dumps(doc))


def _hf_text(folder: Path, model_name: str) -> None:
    _edit(folder, name="hf-text", options={"model_name": model_name, "pretrained": False})


def test_an_auto_map_folder_inside_the_checkpoint_is_refused_not_run(saved: Path) -> None:
    evil = _evil_folder(saved / "custom")
    _hf_text(saved, "custom")
    with pytest.raises(ConfigError, match="never runs a model's own code"):
        FusionModel.from_pretrained(saved)
    assert not (evil / "RAN").exists()


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "working_folder", "home"])
def test_references_outside_the_folder_are_refused(saved: Path, tmp_path: Path, kind: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    evil = _evil_folder(tmp_path / "outside")
    monkeypatch.chdir(tmp_path)
    name = {"absolute": str(evil), "dotdot": "../outside", "symlink": "link", "working_folder": "outside",
            "home": "~/outside"}[kind]
    if kind == "symlink":
        (saved / "link").symlink_to(evil)
    _hf_text(saved, name)
    with pytest.raises(CheckpointError, match="allow_external_paths=True"):
        FusionModel.from_pretrained(saved)
    assert not (evil / "RAN").exists()


def test_allow_external_paths_opts_in_but_custom_code_still_never_runs(saved: Path, tmp_path: Path) -> None:
    evil = _evil_folder(tmp_path / "outside")
    _hf_text(saved, str(evil))
    with pytest.raises(ConfigError, match="trust_remote_code=False"):  # got past the path check, into transformers
        FusionModel.from_pretrained(saved, allow_external_paths=True)
    assert not (evil / "RAN").exists()


def test_a_symlinked_weights_file_leaving_the_folder_is_refused(saved: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    (saved / "model.safetensors").rename(outside)
    (saved / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink leaving the checkpoint folder"):
        FusionModel.from_pretrained(saved)
    assert isinstance(FusionModel.from_pretrained(saved, allow_external_paths=True), FusionModel)


def test_every_transformers_load_passes_trust_remote_code_false() -> None:
    found, unsafe = 0, []
    for path in sorted((ROOT / "encoders").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("from_pretrained", "from_config") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto"):
                found += 1
                flag = next((k.value for k in node.keywords if k.arg == "trust_remote_code"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    unsafe.append(f"{path.name}:{node.lineno}")
    assert found >= 6
    assert not unsafe, f"transformers loads without trust_remote_code=False at {unsafe}"


def test_a_by_reference_record_without_hash_is_refused(saved: Path) -> None:
    doc = json.loads((saved / "config.json").read_text())
    doc["encoders"]["text"].update(stored="reference", weights_sha256=None)  # edited: "trust me, rebuild it"
    (saved / "config.json").write_text(json.dumps(doc))
    weights = {k: v for k, v in load_file(saved / "model.safetensors").items() if not k.startswith("encoders.")}
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="records no weights_sha256"):
        FusionModel.from_pretrained(saved)
    assert isinstance(FusionModel.from_pretrained(saved, check_hashes=False), FusionModel)  # the explicit opt-out


def _meta_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if a model or sized encoder is built on a real device (the old code allocated gigabytes)."""
    devices: list[str] = []

    def build(config: FusionModelConfig, **kwargs: Any) -> FusionModel:
        devices.append(torch.empty(0).device.type)
        if devices[-1] != "meta":
            raise AssertionError("the fused model was built for real before the size check")
        return FusionModel(config, **kwargs)

    monkeypatch.setattr(checkpoint, "build_encoder", lambda m, spec, where: (_ for _ in ()).throw(
        AssertionError("an encoder was built for real before the size check")) if spec.options else
        checkpoint.create_encoder(spec.name))
    return devices, build  # type: ignore[return-value]


def test_a_huge_hidden_dim_is_refused_before_any_tensor_is_built(saved: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.loads((saved / "config.json").read_text())
    doc["model"]["hidden_dim"] = 16000  # within MAX_HIDDEN_DIM, but ~2 GB of head weights
    (saved / "config.json").write_text(json.dumps(doc))
    devices, build = _meta_only(monkeypatch)
    with pytest.raises(CheckpointError, match="above the limit of 500,000,000"):
        checkpoint.load_checkpoint(build, saved)
    assert devices == ["meta"]


def test_a_huge_encoder_option_is_refused_before_it_is_built(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edit(saved, options={"hidden_size": 16000})  # tiny-text at 16000 wide (within its bound): ~2 GB
    devices, build = _meta_only(monkeypatch)
    with pytest.raises(CheckpointError, match="its encoders would have .* parameters, above the limit"):
        checkpoint.load_checkpoint(build, saved)
    assert devices == []


def test_the_parameter_limit_is_overridable(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="pass max_parameters="):
        FusionModel.from_pretrained(saved, max_parameters=1000)
    monkeypatch.setenv(checkpoint.MAX_PARAMETERS_ENV, "1000")
    with pytest.raises(CheckpointError, match="above the limit of 1,000"):
        FusionModel.from_pretrained(saved)
    assert isinstance(FusionModel.from_pretrained(saved, max_parameters=10**9), FusionModel)


def test_deep_or_huge_config_json_is_refused(saved: Path) -> None:
    cfg = saved / "config.json"
    cfg.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")  # was RecursionError
    with pytest.raises(CheckpointError, match="nested deeper than 64 levels"):
        FusionModel.from_pretrained(saved)
    cfg.write_text('{"model": ' + "[" * 70 + "]" * 70 + "}")  # parses, but deeper than the cap
    with pytest.raises(CheckpointError, match="nested deeper than 64 levels"):
        FusionModel.from_pretrained(saved)
    cfg.write_text(json.dumps({"model": {}, "notes": "x" * (9 << 20)}))
    with pytest.raises(CheckpointError, match="above the 8388608-byte limit"):
        FusionModel.from_pretrained(saved)


def test_integer_weights_for_float_parameters_are_refused(saved: Path) -> None:
    weights = load_file(saved / "model.safetensors")
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key].round().to(torch.int64)  # was silently cast back to float
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"integer weights for float parameters .*{key}"):
        FusionModel.from_pretrained(saved)


def _mel_checkpoint(tmp_path: Path) -> Path:
    cfg = FusionModelConfig(encoders={"audio": {"name": "mel-cnn", "options": {"channels": [8], "embed_dim": 8,
                                                                                 "num_heads": 2}}},
                            labels=("a", "b"), hidden_dim=8)
    return FusionModel(cfg).save_pretrained(tmp_path / "mel")


def test_an_encoder_that_cannot_be_sized_on_meta_loads_under_a_memory_cap(tmp_path: Path) -> None:
    folder = _mel_checkpoint(tmp_path)  # mel-cnn reads tensor values while building: no meta-device count
    assert isinstance(FusionModel.from_pretrained(folder), FusionModel)
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["encoders"]["audio"]["options"]["channels"] = [4096, 4096, 4096]  # ~600 MB a layer
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="needs more memory than the parameter limit allows|above the limit"):
        FusionModel.from_pretrained(folder, max_parameters=10_000_000)


def test_cli_predict_refuses_external_paths_in_one_line_unless_allowed(saved: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from recipes.cli import main

    evil = _evil_folder(tmp_path / "outside")
    _hf_text(saved, str(evil))
    assert main(["predict", "--model", str(saved), "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert "points outside the checkpoint folder" in err and "--allow-external-paths" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["predict", "--model", str(saved), "--text", "hi", "--allow-external-paths"]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code=False" in err and not (evil / "RAN").exists()  # past the path check, code refused
