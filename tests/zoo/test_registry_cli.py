"""Named pretrained models (list/info/load/register) and the zoo CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
from fusion_errors import RegistryError
from zoo import registry
from zoo.cli import main
from zoo.hub import save_pretrained


@pytest.fixture
def zoo_dir(make_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary zoo with two shipped models."""
    monkeypatch.setattr(registry, "PRETRAINED_DIR", tmp_path / "pretrained")
    monkeypatch.setattr(registry, "_REGISTERED", {})
    metrics = {"test": {"fused": {"accuracy": 0.75}}}
    save_pretrained(make_model(stage="late", fusion_head="gating"), tmp_path / "pretrained" / "toy-late-gating",
                    metrics=metrics, recipe_command="fusion-zoo fit --model.fusion_head gating")
    save_pretrained(make_model(stage="early"), tmp_path / "pretrained" / "toy-early-concat", metrics=metrics)
    return tmp_path / "pretrained"


def test_list_info_load_register(zoo_dir: Path, make_model, tmp_path: Path) -> None:
    assert registry.list_pretrained() == ["toy-early-concat", "toy-late-gating"]
    assert registry.list_pretrained("*-late-*") == ["toy-late-gating"]
    data = registry.info("toy-late-gating")
    assert data["metrics"]["test"]["fused"]["accuracy"] == 0.75
    assert "fusion-zoo fit --model.fusion_head gating" in data["card"]
    model = zoo.load("toy-late-gating")
    assert model.config.fusion_head == "gating"
    with pytest.raises(RegistryError, match="unknown pretrained model 'toy-late-gatin'.*Did you mean"):
        zoo.load("toy-late-gatin")
    registry.register_pretrained("remote-one", "hf-hub:org/remote-one", description="online only")
    assert "remote-one" in registry.list_pretrained()
    assert registry.info("remote-one") == {"name": "remote-one", "source": "hf-hub:org/remote-one",
                                           "description": "online only"}
    with pytest.raises(RegistryError, match="already registered"):
        registry.register_pretrained("toy-early-concat", "hf-hub:org/x")
    with pytest.raises(RegistryError, match="neither"):
        registry.register_pretrained("local-two", tmp_path / "missing")


def test_cli_list_info_predict(zoo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list", "--names"]) == 0
    assert capsys.readouterr().out.split() == ["toy-early-concat", "toy-late-gating"]
    assert main(["zoo", "list"]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["name", "data", "modalities", "stage", "head", "test", "acc"]
    assert [r.split()[0] for r in rows] == ["toy-early-concat", "toy-late-gating"]
    assert rows[1].split()[-3:] == ["late", "gating", "0.7500"]
    assert main(["zoo", "info", "toy-late-gating"]) == 0
    assert "gating" in capsys.readouterr().out
    assert main(["zoo", "info", "toy-late-gating", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["test"]["fused"]["accuracy"] == 0.75
    assert main(["predict", "--model", "toy-late-gating", "--text", "hello", "--text", "world"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i][:4] for i in starts] == ["[0] ", "[1] "]
    table = lines[starts[0] + 1: starts[1]]  # header + one row per modality, gates as a column
    assert table[0].split()[:4] == ["modality", "contrib", "share", "gates"]
    assert [row.split()[0] for row in table[1:]] == ["audio", "image", "text"]
    assert lines[-1].startswith("contrib: drop in the predicted class's probability")
    assert main(["predict", "--model", "toy-late-gating", "--text", "hello", "--no-explain"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert main(["predict", "--model", "toy-early-concat", "--text", "hello", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-5


def test_cli_export_convert(zoo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.pt"
    assert main(["export", "toy-early-concat", "--format", "torchscript", "--output", str(out), "--verify"]) == 0
    assert out.is_file() and "max abs difference" in capsys.readouterr().out
    assert main(["convert", str(zoo_dir / "toy-early-concat"), "--output", str(tmp_path / "x.ckpt")]) == 0
    assert main(["convert", str(tmp_path / "x.ckpt"), "--output", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    assert torch.load(tmp_path / "x.ckpt", weights_only=True)["hyper_parameters"]["config"]["stage"] == "early"


@pytest.mark.parametrize("argv", [
    ["zoo", "info", "nope"],
    ["predict", "--model", "toy-late-gating"],
    ["predict", "--model", "/no/such/folder", "--text", "x"],
    ["convert", "/no/such.ckpt", "--output", "out"],
])
def test_cli_errors_one_line_exit_2(zoo_dir: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "error:" in captured.err
    assert "Traceback" not in captured.err


def test_push_to_hub_validates_repo_id(zoo_dir: Path) -> None:
    from fusion_errors import CheckpointError
    from zoo.hub import push_to_hub

    for bad in ("no-slash", "a/b/c", "/name"):
        with pytest.raises(CheckpointError, match="must look like 'org/name'"):
            push_to_hub(zoo_dir / "toy-early-concat", bad)


def test_push_dry_run_writes_exactly_the_upload_folder(zoo_dir: Path, make_model, raw, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from zoo.hub import from_pretrained

    (zoo_dir / "toy-late-gating" / "notes.txt").write_text("not part of the model")
    out = tmp_path / "upload"
    assert main(["push", "toy-late-gating", "org/toy", "--private", "--dry-run", str(out)]) == 0  # a zoo name
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("README.md", "config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (zoo_dir / "toy-late-gating" / name).read_bytes()
    with torch.no_grad():
        want = from_pretrained("toy-late-gating")
        got = from_pretrained(out)
        torch.testing.assert_close(got(got.preprocess(**raw)).logits, want(want.preprocess(**raw)).logits)
    assert main(["push", "toy-late-gating", "org/toy", "--dry-run", str(out)]) == 2  # never into a full folder
    assert "not empty" in capsys.readouterr().err
    from zoo.hub import push_to_hub

    model_dir = push_to_hub(make_model(), "org/toy", dry_run=tmp_path / "from-model")  # an in-memory model
    assert sorted(p.name for p in Path(model_dir).iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_push_offline_fails_with_one_line(zoo_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    assert main(["push", "toy-early-concat", "org/toy", "--token", "hf_not_a_token"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the test environment may also set HF_HUB_OFFLINE: either way one line that names the cause
    assert len(err) == 1 and ("cannot reach the Hub" in err[0] or "HF_HUB_OFFLINE is set" in err[0]), err
