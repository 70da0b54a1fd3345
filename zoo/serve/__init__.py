"""``fusion-zoo serve``: a fused model behind an HTTP API and a web page, with dynamic batching.

``serve("tridigits-late-gating")`` loads the model offline and serves it on http://127.0.0.1:8000 until
SIGINT/SIGTERM (in-flight requests finish first while ``/health`` answers 503; see ``zoo.serve.server``).
``create_app(model)`` gives the ASGI app for other servers.
The web stack (fastapi, uvicorn, python-multipart) is the ``serve`` extra: ``pip install 'fusion-zoo[serve]'``.
See docs/serve.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_errors import ConfigError, FusionZooError, MissingDependencyError

from .inputs import Limits

if TYPE_CHECKING:
    from .app import ServeConfig

__all__ = ["serve", "create_app", "ServeConfig", "Limits", "add_arguments", "config_from_args", "require_web_stack",
           "optimize_for_serving"]

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def require_web_stack() -> None:
    """Raise :class:`MissingDependencyError` naming the install command when the ``serve`` extra is missing."""
    missing = []
    for module, pip_name in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        try:
            __import__(module)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise MissingDependencyError(f"fusion-zoo serve needs {', '.join(missing)}: pip install 'fusion-zoo[serve]' "
                                     f"(or pip install {' '.join(missing)}).")


def __getattr__(name: str) -> Any:  # the web stack is imported only when used
    if name in ("create_app", "ServeConfig"):
        require_web_stack()
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'zoo.serve' has no attribute {name!r}")


def _source_folder(name_or_path: str) -> str | None:
    """The local checkpoint folder of a path or a shipped/registered zoo name (for the card), else None."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    from ..registry import list_pretrained, source_of

    if name_or_path in list_pretrained():
        source = source_of(name_or_path)
        return source if Path(source).is_dir() else None
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def optimize_for_serving(model: Any, graph: bool = False) -> Any:
    """Fold the image encoder's BatchNorms into its convolutions, channels-last (``zoo.optimize``), in place.

    Outputs match the unfused model within 1e-4 (checked on an example); a model whose norms cannot be folded
    is served as it is, with a warning. Large batches of a folded channels-last EfficientNet run about as fast
    per image as small ones, which an unfolded one does not, so this is what lets batching pay on images.
    With ``graph`` (opt-in) each folded image encoder then runs its CPU batches as a frozen TorchScript graph
    (``zoo.optimize.GraphEncode``: built when an image size repeats, checked against the folded encoder once per
    batch size); features may then differ from the model's by up to ~1.4e-4.
    """
    from ..fold import count_batchnorms
    from ..graph import GraphEncode, graph_available
    from ..optimize import fuse_for_inference

    encoders = getattr(model, "encoders", None)
    folding = [e for e in (encoders.values() if encoders is not None else ())
               if getattr(e, "modality", "") == "image" and count_batchnorms(e)]
    try:
        model = fuse_for_inference(model, inplace=True)
    except FusionZooError as e:
        print(f"fusion-zoo serve: warning: serving the model unfused ({e})", file=sys.stderr)
        return model
    if graph and graph_available():
        for encoder in folding:
            encoder.encode = GraphEncode(encoder)
    return model


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          online: bool = False, threads: int | None = None, log_level: str = "info", fuse: bool = True) -> None:
    """Load ``model`` (zoo name, folder or ``hf-hub:org/name``) and serve it until SIGINT/SIGTERM.

    Args:
        model: what to load; offline unless ``online`` (zoo names and folders never need the network).
        host: interface to bind; the default answers this machine only.
        port: TCP port.
        config: batching, queue, timeout and size limits.
        online: allow downloads from the Hugging Face Hub (``hf-hub:`` models, encoder weights).
        threads: torch intra-op threads of the forward pass (default: torch's).
        log_level: uvicorn's log level.
        fuse: fold BatchNorms for inference first (:func:`optimize_for_serving`).
    """
    require_web_stack()
    import uvicorn

    from .. import from_pretrained
    from .app import SLOT_WAIT_S, ServeConfig, create_app
    from .server import GracefulServer

    if not online:
        for var in _OFFLINE_ENV:
            os.environ.setdefault(var, "1")
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = config or ServeConfig()
    if not _is_loopback(host):
        print(f"fusion-zoo serve: warning: binding {host}: anyone who can reach this machine can use the model "
              "(there is no authentication); put it behind a proxy that has.", file=sys.stderr)
    loaded = from_pretrained(model, online=online)
    if fuse:
        loaded = optimize_for_serving(loaded)
    name = Path(model).name if Path(model).expanduser().is_dir() else model
    app = create_app(loaded, name=name, source=_source_folder(model), config=cfg)
    print(f"fusion-zoo serve: {name} on http://{host}:{port}/ (API: /predict, schema: /openapi.json; "
          "Ctrl+C stops after the open requests)", file=sys.stderr, flush=True)
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=math.ceil(cfg.request_timeout_s) + 5),
                            app.state.gate, drain_timeout_s=cfg.request_timeout_s + SLOT_WAIT_S + 1)
    server.run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fusion-zoo serve``."""
    d = Limits()
    p.add_argument("--model", required=True, help="zoo name (fusion-zoo zoo list), model folder or hf-hub:org/name")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--online", action="store_true", help="allow Hugging Face Hub downloads (default: offline)")
    p.add_argument("--max-batch-size", type=int, default=32, help="samples per forward pass (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch")
    p.add_argument("--max-queue", type=int, default=256, help="queued samples before 503 + Retry-After")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (queue + forward) before 504")
    p.add_argument("--max-queue-wait", type=float, default=None,
                   help="seconds of queued work beyond which a new request gets 503 + Retry-After at once, before "
                        "its body is read (default: a quarter of --timeout)")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / 2**20, help="request body limit")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="width x height limit")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds)
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    p.add_argument("--max-batch-items", type=int, default=None,
                   help=f"samples per /predict/batch (default {d.max_batch_items}, or --max-queue if that is lower)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the forward pass")
    p.add_argument("--no-fuse", action="store_true", help="serve without folding BatchNorms (zoo.optimize)")
    p.add_argument("--swagger-ui", action="store_true", help="serve /docs (Swagger UI loads its JS from a CDN)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """``fusion-zoo serve`` options -> :class:`ServeConfig`; out-of-range values are a :class:`ConfigError`."""
    require_web_stack()
    from .app import ServeConfig

    checks = {"--port": (args.port, 0 <= args.port <= 65535), "--max-batch-size": (args.max_batch_size,
              args.max_batch_size >= 1), "--max-wait-ms": (args.max_wait_ms, args.max_wait_ms >= 0),
              "--max-queue": (args.max_queue, args.max_queue >= 1), "--timeout": (args.timeout, args.timeout > 0),
              "--max-request-mb": (args.max_request_mb, args.max_request_mb > 0),
              "--max-image-pixels": (args.max_image_pixels, args.max_image_pixels >= 1),
              "--max-audio-seconds": (args.max_audio_seconds, args.max_audio_seconds > 0),
              "--max-text-chars": (args.max_text_chars, args.max_text_chars >= 1),
              "--max-batch-items": (args.max_batch_items, args.max_batch_items is None or args.max_batch_items >= 1),
              "--max-queue-wait": (args.max_queue_wait, args.max_queue_wait is None or args.max_queue_wait > 0)}
    bad = [f"{k} {v}" for k, (v, ok) in checks.items() if not ok]
    if bad:
        raise ConfigError(f"out of range: {', '.join(bad)}; sizes, counts and times must be positive "
                          "(--max-wait-ms may be 0, --port 0-65535).")
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_image_pixels=args.max_image_pixels,
                    max_audio_seconds=args.max_audio_seconds, max_text_chars=args.max_text_chars,
                    max_batch_items=args.max_batch_items if args.max_batch_items is not None else
                    min(Limits().max_batch_items, args.max_queue))  # a lower --max-queue alone is a valid setting
    return ServeConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                       request_timeout_s=args.timeout, max_queue_wait_s=args.max_queue_wait, limits=limits,
                       swagger_ui=args.swagger_ui)


def main(args: argparse.Namespace) -> int:
    """Run ``fusion-zoo serve`` from parsed arguments (called by ``zoo.cli``).

    After a graceful stop the process ends at once with exit code 0 (``os._exit`` once the logs are flushed):
    the interpreter's teardown of torch and the encoder libraries takes seconds, and Ctrl-C should return now.
    """
    serve(args.model, host=args.host, port=args.port, config=config_from_args(args), online=args.online,
          threads=args.threads, log_level=args.log_level, fuse=not args.no_fuse)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
