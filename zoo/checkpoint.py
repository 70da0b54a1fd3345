"""The fused checkpoint folder: ``config.json`` + ``model.safetensors`` + ``README.md``, written and read.

Frozen encoders are stored by reference (registry name, options and a sha256 of their weights), fine-tuned
ones in full, LoRA ones as adapter weights only. The format is described in docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from encoders import Encoder, create_encoder
from fusion_common.hub import hub_or_cache
from fusion_errors import CheckpointError, ConfigError, FusionZooError, MissingDependencyError, RegistryError
from fusion_heads import list_fusion_heads

from . import _format as fmt
from .card import render_card
from .config import FusionModelConfig
from .registry import list_pretrained, source_of

__all__ = ["save_pretrained", "load_checkpoint", "resolve", "hub_id", "read_config", "estimate_parameters", "HF_PREFIX",
           "MAX_PARAMETERS", "MAX_PARAMETERS_ENV", "MAX_CONFIG_BYTES", "MAX_JSON_DEPTH"]

HF_PREFIX = "hf-hub:"
# A checkpoint is untrusted input (docs/errors.md, "Safe loading"): these bound what it can demand.
MAX_PARAMETERS = 500_000_000  # ~2 GB of float32; override with max_parameters= or $FUSION_ZOO_MAX_PARAMETERS
MAX_PARAMETERS_ENV = "FUSION_ZOO_MAX_PARAMETERS"
MAX_CONFIG_BYTES = 8 << 20  # config.json larger than 8 MiB is not a fusion-zoo config
MAX_JSON_DEPTH = 64  # save_pretrained writes depth <= 6; deeper nesting is refused (not a RecursionError)


M = TypeVar("M", bound=torch.nn.Module)
_PIP_NAMES = {"resemblyzer": "resemblyzer", "torchcrepe": "torchcrepe", "timm": "timm", "peft": "peft",
              "transformers": "transformers", "huggingface_hub": "huggingface_hub"}


def save_pretrained(
    model: torch.nn.Module,
    path: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    recipe_command: str | None = None,
    dataset: str | None = None,
    notes: str | None = None,
    seed: int | None = None,
) -> Path:
    """Write ``model`` into the folder ``path`` atomically and return it.

    Args:
        model: the fused model (a ``zoo.FusionModel``: it has ``config`` and ``encoders``).
        path: target folder (created; an existing checkpoint there is replaced only once the new one is complete).
        metrics: nested ``{split: {group: {metric: value}}}`` results, shown in the card.
        recipe_command: the command that trained the model, shown in the card.
        dataset: what it was trained on, shown in the card.
        notes: free text for the card.
        seed: the training seed, recorded in config.json.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, FusionModelConfig):
        raise CheckpointError(f"save_pretrained needs a zoo.FusionModel, got {type(model).__name__}.")
    own: Any = getattr(model, "encoders", {})
    modes = {m: fmt.stored_mode(own[m] if m in own else None, spec) for m, spec in config.encoders.items()}
    records: dict[str, dict[str, Any]] = {}
    for m, spec in config.encoders.items():
        enc: Any = own[m] if m in own else None
        records[m] = {
            "name": spec.name,
            "options": dict(spec.options),
            "finetune": spec.finetune,
            # a head-only model records the hash of the encoder its spec builds, so loading can check it
            "weights_sha256": fmt.reference_hash(enc, "lora" if modes[m] == "lora" else "reference")
            if enc is not None else fmt._fresh_hash(spec, "reference"),
            "stored": modes[m],
            "preprocessing": fmt.portable_preprocessing(enc.preprocessor.to_dict()) if enc is not None else None,
        }
    doc = {
        "format_version": fmt.CHECKPOINT_FORMAT,
        "fusion_zoo_version": fmt.library_versions().get("fusion-zoo", "unknown"),
        "model": config.to_dict(),
        "encoders": records,
        "metrics": metrics or {},
        "seed": seed,
        "recipe_command": recipe_command,
        "dataset": dataset,
        "libraries": fmt.library_versions(),
    }
    weights = fmt.weights_to_save(model, modes)
    target = Path(path)
    with fmt.atomic_folder(target) as tmp:
        save_file(weights, str(tmp / fmt.WEIGHTS_FILE), metadata={"format": "pt", "fusion_zoo_format": "1"})
        (tmp / fmt.CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / fmt.CARD_FILE).write_text(render_card(doc, notes=notes, name=target.name))
    return target


# loading ---------------------------------------------------------------------------------------
#: a Hub repo id: ``owner/name`` (letters, digits, ``-``, ``_``, ``.``), as the Hub spells them
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def hub_id(name_or_path: str | Path) -> str | None:
    """The Hub repo id that ``name_or_path`` names, or None for a local folder or zoo name.

    ``hf-hub:owner/name`` always names the Hub; a bare ``owner/name`` does when no such local folder exists (the
    way ``transformers`` reads its ``from_pretrained`` argument).
    """
    text = str(name_or_path)
    if text.startswith(HF_PREFIX):
        return text[len(HF_PREFIX):]
    if isinstance(name_or_path, str) and _REPO_ID.fullmatch(text) and not Path(text).expanduser().exists() \
            and text not in list_pretrained():
        return text
    return None


def resolve(name_or_path: str | Path) -> Path:
    """A local folder, a zoo name (``zoo.list_pretrained()``), or a Hub repo (``owner/name`` or ``hf-hub:owner/name``,
    read from the local Hub cache when offline) -> a local folder."""
    text = str(name_or_path)
    repo = hub_id(name_or_path)
    if repo is not None:
        return _download(repo)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text in list_pretrained():
        return resolve(source_of(text))
    raise CheckpointError(
        f"{text!r} is neither a folder nor a zoo model; give a folder written by save_pretrained, a Hub repo id "
        f"('owner/name'), or one of: {', '.join(list_pretrained()) or '(no zoo models shipped)'}."
    )


def _download(repo_id: str) -> Path:
    """The repo's snapshot folder in the Hugging Face cache: downloaded when online, found in the cache offline."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:
        raise MissingDependencyError("Hub models need huggingface_hub: pip install huggingface_hub") from e
    files = [fmt.CONFIG_FILE, fmt.WEIGHTS_FILE, fmt.CARD_FILE]
    unreachable = None
    try:
        with hub_or_cache(repo_id) as unreachable:  # one quick connection check, not a minute of retries
            return Path(snapshot_download(repo_id=repo_id, allow_patterns=files))
    except Exception as e:
        where = ("it is not in the local Hub cache and HF_HUB_OFFLINE is set: unset it to download, or pass the "
                 "local folder" if constants.HF_HUB_OFFLINE else "check the repo id and the network, or download it "
                 "elsewhere and pass the local folder")
        if unreachable:
            where = f"the Hugging Face Hub is unreachable ({unreachable}); connect, or pass the local folder"
        raise CheckpointError(f"{repo_id!r} is no local folder, and fetching it as a Hub model failed "
                              f"({type(e).__name__}: {str(e)[:200]}); {where}.") from e


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read, migrate and check ``config.json`` of a checkpoint folder (no model is built)."""
    file = Path(folder) / fmt.CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; a checkpoint folder needs {fmt.CONFIG_FILE} and {fmt.WEIGHTS_FILE} "
                              "(write one with model.save_pretrained(path)).")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{file} is {size} bytes, above the {MAX_CONFIG_BYTES}-byte limit of a config.json; "
                              "this is not a fusion-zoo checkpoint (re-save the model with save_pretrained).")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-save the model with save_pretrained.") from e
    except RecursionError as e:
        raise CheckpointError(f"{file} is nested deeper than {MAX_JSON_DEPTH} levels; re-save the model with "
                              "save_pretrained.") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file} must hold a JSON object; re-save the model with save_pretrained.")
    if _depth(doc) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{file} is nested deeper than {MAX_JSON_DEPTH} levels; re-save the model with "
                              "save_pretrained.")
    return fmt.migrate(doc, str(file))


def _depth(value: Any, level: int = 1) -> int:
    """Nesting depth of a parsed JSON value (stops counting past MAX_JSON_DEPTH)."""
    if level > MAX_JSON_DEPTH or not isinstance(value, (dict, list)):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level)


# references a checkpoint may make -------------------------------------------------------------
def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):  # outside, or a symlink loop
        return False
    return True


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _check_value(value: str, where: str, folder: Path, root: Path) -> str:
    """A string option of a checkpoint: a file inside the folder (returned absolute), or a name / hub id.

    Absolute paths, ``~``, ``..``, symlinks leaving the folder and paths that exist only relative to the working
    folder are refused: a downloaded checkpoint must not make the loader open arbitrary files.
    """
    fix = "; pass allow_external_paths=True (CLI: --allow-external-paths) if you trust this checkpoint"
    if "\x00" in value:
        raise CheckpointError(f"{where}={value!r} holds a NUL byte; this checkpoint is corrupt or hostile.")
    path = Path(value)
    if value.startswith("~") or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise CheckpointError(f"{where}={value!r} points outside the checkpoint folder {folder}{fix}.")
    local = folder / path
    if _exists(local):
        if not _inside(local, root):
            raise CheckpointError(f"{where}={value!r} is a symlink leaving the checkpoint folder {folder}{fix}.")
        return str(local.resolve())
    if _exists(path):
        raise CheckpointError(f"{where}={value!r} would be read from the working folder ({Path.cwd()}), not from "
                              f"the checkpoint folder {folder}{fix}.")
    return value  # a registered option value or a hub id


def _checked_options(value: Any, where: str, folder: Path, root: Path) -> Any:
    if isinstance(value, str):
        return _check_value(value, where, folder, root)
    if isinstance(value, list):
        return [_checked_options(v, f"{where}[{i}]", folder, root) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _checked_options(v, f"{where}.{k}", folder, root) for k, v in value.items()}
    return value


def _safe_references(config: FusionModelConfig, folder: Path, root: Path) -> FusionModelConfig:
    """``config`` with every encoder option checked by :func:`_check_value` (files inside the folder made
    absolute, so they never resolve against the working folder)."""
    for f in (fmt.CONFIG_FILE, fmt.WEIGHTS_FILE):
        if _exists(folder / f) and not _inside(folder / f, root):
            raise CheckpointError(f"{folder / f} is a symlink leaving the checkpoint folder; copy the real file in, "
                                  "or pass allow_external_paths=True (CLI: --allow-external-paths).")
    specs = {}
    for m, spec in config.encoders.items():
        options = _checked_options(dict(spec.options), f"config.json encoders.{m}.options", folder, root)
        specs[m] = spec if options == spec.options else type(spec)(**{**spec.to_dict(), "options": options})
    return config.replace(encoders=specs)


def _max_parameters(max_parameters: int | None) -> int:
    if max_parameters is not None:
        return int(max_parameters)
    env = os.environ.get(MAX_PARAMETERS_ENV)
    if env:
        try:
            return int(float(env))
        except ValueError as e:
            raise ConfigError(f"${MAX_PARAMETERS_ENV}={env!r} is not a number of parameters.") from e
    return MAX_PARAMETERS


def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_numeric(v) for v in value)
    return isinstance(value, dict) and any(_numeric(v) for v in value.values())


def _sized(spec: Any) -> bool:
    """Whether numbers in an encoder's options may set its size (fixed-size encoders are built as registered)."""
    return any(_numeric(v) for v in spec.options.values())


def _meta(fn: Callable[[], Any], what: str, where: str) -> Any:
    """Run ``fn`` with tensors created on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"):
            return fn()
    except FusionZooError:
        raise
    except Exception as e:  # a factory given sizes it cannot take
        raise ConfigError(f"{where}: {what} in config.json cannot be built ({type(e).__name__}: {e}).") from e


def _guarded(fn: Callable[[], Any], limit: int, what: str, where: str) -> Any:
    """Run ``fn`` with the address space capped near ``limit`` float32 parameters more than now (Linux), so a
    build that cannot be sized on the meta device still cannot take the machine's memory."""
    try:
        import resource

        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return fn()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + 4 * limit + (1 << 30)
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            cap = min(cap, bound)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        return fn()
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        raise CheckpointError(f"{where}: {what} needs more memory than the parameter limit allows ({limit:,} "
                              f"parameters); if you trust this checkpoint pass a larger max_parameters.") from e
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _size_encoder(m: str, spec: Any, where: str, limit: int) -> tuple[int, int, Encoder | None]:
    """(parameters, width, the encoder when it had to be built for real) of an encoder whose options hold numbers:
    counted on the meta device, or built under a memory cap when its factory cannot run there."""
    try:
        with torch.device("meta"):
            enc = create_encoder(spec.name, finetune="frozen", **spec.options)
        return _numel(enc), int(enc.embed_dim), None
    except FusionZooError:
        raise
    except Exception:  # factories that read tensor values (.item()) or weight files cannot run on meta
        pass
    real = _guarded(lambda: build_encoder(m, spec, where), limit, f"the {m} encoder {spec.name!r}", where)
    return _numel(real), int(real.embed_dim), real


def estimate_parameters(build: Callable[..., Any], config: FusionModelConfig, embed_dims: dict[str, int],
                        where: str = "config") -> int:
    """Parameters (and buffers) of the fused part of ``build(config)`` given the encoders' widths, counted on the
    meta device: nothing is allocated, so a config asking for billions of parameters costs nothing to check."""
    return _numel(_meta(lambda: build(config, embed_dims=embed_dims), "the fused model", where))


def _refuse(count: int, limit: int, what: str, where: str) -> None:
    if count > limit:
        raise CheckpointError(
            f"{where}: {what} would have {count:,} parameters, above the limit of {limit:,} (~{limit * 4 / 2**30:.1f} "
            f"GiB of float32); if you trust this checkpoint pass max_parameters={count} (or set "
            f"${MAX_PARAMETERS_ENV})."
        )


def build_encoder(m: str, spec: Any, where: str, source: str = "config.json") -> Encoder:
    """Modality ``m``'s encoder from its spec; a missing package, options the factory cannot take and an encoder
    of another modality are one-line errors naming ``where`` and what to fix in ``source``."""
    encoder = _create(m, spec, where, source)
    check_modality(m, encoder, where, spec.name)
    return encoder


def check_modality(m: str, encoder: Any, where: str, name: str | None = None) -> None:
    """ConfigError when ``encoder`` (registered as ``name``) encodes another modality than ``m``."""
    if getattr(encoder, "modality", m) != m:
        name = name or (getattr(encoder, "spec", None) or {}).get("name") or type(encoder).__name__
        raise ConfigError(f"{where}: encoders.{m} is {name!r}, which encodes {encoder.modality}, not {m}; give "
                          f"each modality an encoder of its own kind (encoders.list_encoders()).")


def _create(m: str, spec: Any, where: str, source: str = "config.json") -> Encoder:
    try:
        return create_encoder(spec.name, finetune=spec.finetune, last_n=spec.last_n, lora_r=spec.lora_r, **spec.options)
    except MissingDependencyError as e:
        raise MissingDependencyError(f"{where}: the {m} encoder {spec.name!r} cannot be built: {e}") from e
    except ModuleNotFoundError as e:
        pkg = _PIP_NAMES.get((e.name or "").split(".")[0], (e.name or "?").split(".")[0].replace("_", "-"))
        raise MissingDependencyError(
            f"{where}: the {m} encoder {spec.name!r} needs the Python package {e.name!r}: pip install {pkg}"
        ) from e
    except (FusionZooError, MemoryError):
        raise
    except Exception as e:  # a config.json is untrusted: options of the wrong type or value fail deep in a factory
        if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):
            raise  # out of memory (under _guarded's cap): reported as a size problem there
        raise ConfigError(f"{where}: the {m} encoder {spec.name!r} cannot be built with options {spec.options} "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); fix encoders.{m}.options in "
                          f"{source}.") from e


def _check_hash(m: str, enc: Encoder, record: dict[str, Any], where: str) -> None:
    want = record.get("weights_sha256")
    if not want:
        raise CheckpointError(
            f"{where}: the {m} encoder {record.get('name')!r} is stored by reference but config.json records no "
            "weights_sha256, so nothing proves the rebuilt encoder is the one it was trained with; re-save the "
            "model with save_pretrained, or pass check_hashes=False to load anyway (predictions may differ)."
        )
    if not isinstance(want, str):
        raise CheckpointError(f"{where}: encoders.{m}.weights_sha256 must be a hex string; re-save the model.")
    got = fmt.reference_hash(enc, record["stored"] if record["stored"] == "lora" else "reference")
    if got != want:
        raise CheckpointError(
            f"{where}: the {m} encoder {record.get('name')!r} has weights sha256 {got[:12]}… but the checkpoint was "
            f"saved with {want[:12]}…; install the encoder package version used at save time, or pass "
            "check_hashes=False to load anyway (predictions may differ)."
        )


def _load_weights(file: Path, device: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; copy the whole checkpoint folder (config.json + model.safetensors).")
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{file} is truncated or corrupt ({e}); download or copy it again, or re-save the model."
        ) from e


def _compare(got: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], where: str, strict: bool,
             want_dtypes: dict[str, torch.dtype] | None = None) -> None:
    want_dtypes = want_dtypes or {}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f"{k} {tuple(got[k].shape)} vs {want[k]}" for k in set(got) & set(want)
                    if tuple(got[k].shape) != want[k])
    problems = []
    if shapes:
        problems.append(f"shape mismatch (file vs config) for {len(shapes)} key(s): {', '.join(shapes[:4])}")
    if strict and missing:
        problems.append(f"{len(missing)} key(s) missing from the weights: {', '.join(missing[:4])}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the weights: {', '.join(unexpected[:4])}")
    dtypes = sorted(f"{k} {got[k].dtype} vs {want_dtypes[k]}" for k in set(got) & set(want_dtypes)
                    if want_dtypes[k].is_floating_point and not got[k].dtype.is_floating_point)
    if dtypes:  # would be cast silently by load_state_dict
        problems.append(f"integer weights for float parameters in {len(dtypes)} key(s): {', '.join(dtypes[:4])}")
    if problems:
        raise CheckpointError(f"{where}: config.json and model.safetensors disagree: {'; '.join(problems)}. "
                              "Copy the two files from the same save, or pass strict=False to load what matches.")


def load_checkpoint(
    build: Callable[..., M], name_or_path: str | Path, *, map_location: str = "cpu", strict: bool = True,
    check_hashes: bool = True, allow_external_paths: bool = False, max_parameters: int | None = None,
    online: bool = False,
) -> M:
    """Load a fused model from a folder, a zoo name or ``hf-hub:org/name`` (returned in eval mode).

    Args:
        build: the model class, called as ``build(config, encoders=...)`` (``FusionModel``).
        name_or_path: what to load (see :func:`resolve`).
        map_location: device for the weights and the model.
        strict: require model.safetensors to hold exactly the weights the config implies.
        check_hashes: check each by-reference encoder's weights against the sha256 recorded at save time (a
            missing hash is then an error).
        allow_external_paths: let config.json reference files outside the checkpoint folder (absolute paths,
            ``..``, symlinks leaving it, paths relative to the working folder). Off by default: a checkpoint is
            untrusted input and may only name registered encoders, hub ids and files inside its own folder.
        max_parameters: refuse a model whose parameter count, estimated from config.json before any tensor is
            built, exceeds this (default :data:`MAX_PARAMETERS` or ``$FUSION_ZOO_MAX_PARAMETERS``).
        online: let the encoders a checkpoint names download from the Hugging Face Hub. Off by default: a name in
            config.json that is neither a file in the folder nor an installed encoder fails at once instead of
            contacting the Hub (an ``hf-hub:`` name is the user's own opt-in and implies it).
    """
    folder = resolve(name_or_path)
    allowed = online or hub_id(name_or_path) is not None
    try:
        with hub_access(allowed):
            return _load(build, folder, name_or_path, map_location, strict, check_hashes, allow_external_paths,
                         max_parameters)
    except FusionZooError as e:
        if allowed or not _not_on_this_machine(e):
            raise
        raise CheckpointError(f"{folder}: an encoder names a model that is neither a file in the folder nor on this "
                              f"machine ({str(e).split(':')[0]}); loading a folder never downloads: pass --online "
                              "(online=True) to fetch it from the Hugging Face Hub.") from e


def _not_on_this_machine(error: BaseException) -> bool:
    """Whether ``error`` comes from a Hub file that is absent locally (and the Hub was off)."""
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return False
        if type(seen).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def hub_access(allowed: bool) -> Iterator[None]:
    """Within the block, the Hugging Face Hub is off unless ``allowed`` (``huggingface_hub``'s offline switch, which
    every transformers/timm download goes through: a request raises at once instead of retrying)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: nothing can download
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not allowed
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _load(build: Callable[..., M], folder: Path, name_or_path: str | Path, map_location: str, strict: bool,
          check_hashes: bool, allow_external_paths: bool, max_parameters: int | None) -> M:
    doc = read_config(folder)
    where = str(folder)
    if not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{folder / fmt.CONFIG_FILE} has no 'model' mapping; re-save the model with "
                              "save_pretrained.")
    try:
        config = FusionModelConfig.from_dict(doc["model"])
    except ConfigError as e:
        raise ConfigError(f"{folder / fmt.CONFIG_FILE}: {e}") from e
    except FusionZooError:
        raise
    except Exception as e:  # values of the right container type but wrong contents (e.g. a dropout "high")
        raise ConfigError(f"{folder / fmt.CONFIG_FILE}: 'model' is not a valid FusionModelConfig "
                          f"({type(e).__name__}: {str(e)[:200]}); re-save the model with save_pretrained.") from e
    if not allow_external_paths:
        hub = hub_id(name_or_path) is not None  # hub snapshots are symlinks into the repo's blob store
        root = folder.resolve().parents[1] if hub else folder.resolve()
        config = _safe_references(config, folder, root)
    limit = _max_parameters(max_parameters)
    if config.fusion_head not in list_fusion_heads():
        raise RegistryError(f"{where}: unknown fusion head {config.fusion_head!r} in config.json; known heads: "
                            f"{', '.join(list_fusion_heads())}. Install the fusion-zoo release that saved it.")
    records = doc.get("encoders") or {}
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise CheckpointError(f"{folder / fmt.CONFIG_FILE}: 'encoders' must map modalities to records; re-save the "
                              "model with save_pretrained.")
    recorded = set(records)
    # sizes first, on the meta device: encoders whose options set their size, then the fused part
    counts: dict[str, int] = {}
    dims: dict[str, int] = {}
    encoders: dict[str, Encoder] = {}
    for m, spec in config.encoders.items():
        if _sized(spec):
            counts[m], dims[m], real = _size_encoder(m, spec, where, limit)
            if real is not None:
                encoders[m] = real
    _refuse(sum(counts.values()), limit, "its encoders", where)
    for m, spec in config.encoders.items():  # fixed-size (registered, pretrained) encoders
        if m not in counts:
            encoders[m] = build_encoder(m, spec, where)
            counts[m], dims[m] = _numel(encoders[m]), int(encoders[m].embed_dim)
    _refuse(sum(counts.values()) + estimate_parameters(build, config, dims, where), limit, "the model", where)
    for m, spec in config.encoders.items():
        record = dict(records.get(m) or {})
        if record.get("stored") not in ("reference", "lora", "full"):  # older formats: infer from the policy
            record["stored"] = {"frozen": "reference", "lora": "lora"}.get(str(spec.finetune), "full")
        records[m] = record
        if m not in encoders:
            encoders[m] = build_encoder(m, spec, where)
        # pre-release (format 0) folders have no records to check; any record must carry its hash
        if check_hashes and record["stored"] in ("reference", "lora") and m in recorded:
            _check_hash(m, encoders[m], record, where)
    model = build(config, encoders=encoders)
    modes = {m: records[m]["stored"] for m in config.encoders}
    weights = _load_weights(folder / fmt.WEIGHTS_FILE, map_location)
    _compare(weights, fmt.expected_keys(model, modes), where, strict,
             {k: v.dtype for k, v in model.state_dict().items()})
    model.load_state_dict(weights, strict=False)
    if check_hashes:
        for m, record in records.items():
            if record["stored"] == "full" and record.get("weights_sha256"):
                _check_hash(m, encoders[m], {**record, "stored": "reference"}, where)
    return model.to(map_location).eval()
