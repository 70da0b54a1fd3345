"""The HTTP API and web page of ``fusion-zoo serve`` (FastAPI), over a :class:`DynamicBatcher`.

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /model``, ``POST /predict``, ``POST /predict/batch``,
``GET /openapi.json``. Request bodies are parsed by hand (multipart or JSON, see :mod:`zoo.serve.inputs`) so
that uploads stay in memory and every error is one ``{"detail": "..."}`` naming the problem and the fix; the
OpenAPI schema still documents both body types.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusion_errors import ConfigError, FusionZooError, InputError

from .batching import DynamicBatcher, Overloaded
from .inputs import (
    LimitError,
    Limits,
    decode_sample,
    parse_json,
    parse_json_sample,
    parse_multipart,
    parse_urlencoded,
)

__all__ = ["ServeConfig", "create_app", "model_summary", "batch_predictor", "Gate"]

log = logging.getLogger("zoo.serve")
#: seconds a request waits for a slot to read and decode its body before it is answered 503 (overload is said fast)
SLOT_WAIT_S = 1.0
_BODY_TYPES = ("multipart/form-data", "application/json", "application/x-www-form-urlencoded")
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
        "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, queues and limits requests (each field is a ``fusion-zoo serve`` option)."""

    max_batch_size: int = 32  # --max-batch-size: samples per forward pass (1 = no batching)
    max_wait_ms: float = 5.0  # --max-wait-ms: how long the first queued sample waits for others
    max_queue: int = 256  # --max-queue: samples waiting before requests get 503 + Retry-After
    request_timeout_s: float = 30.0  # --timeout: queue wait + forward pass, then 504
    # --max-queue-wait: a request expected to wait longer than this (from recent batch times) is answered 503 +
    # Retry-After before its body is read; None = a quarter of request_timeout_s, so overload is said, not waited out
    max_queue_wait_s: float | None = None
    limits: Limits = field(default_factory=Limits)
    swagger_ui: bool = False  # --swagger-ui: /docs loads Swagger UI's JS from a CDN, so it is off by default

    def __post_init__(self) -> None:
        if self.limits.max_batch_items > self.max_queue:
            raise ConfigError(f"max_batch_items={self.limits.max_batch_items} > max_queue={self.max_queue}: such a "
                              "batch could never be queued; lower --max-batch-items or raise --max-queue.")

    @property
    def queue_wait_s(self) -> float:
        return self.max_queue_wait_s if self.max_queue_wait_s is not None else self.request_timeout_s / 4

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Gate:
    """Prediction requests in flight, and whether the server is draining (``GracefulServer`` sets it on SIGTERM).

    While draining, ``/health`` answers 503 and new predictions 503 + Retry-After, but the listener stays open, so
    a load balancer sees the instance leave instead of refused connections; the open requests finish.
    """

    def __init__(self) -> None:
        self.in_flight = 0  # prediction requests open
        self.unqueued = 0  # ... of which not yet in the batcher's queue (waiting for a slot, reading, decoding)
        self.draining = False

    @contextlib.contextmanager
    def request(self) -> Iterator[Callable[[], None]]:
        """Count one prediction request while it is open; yields ``queued()``, to call once its samples are
        queued (or refused)."""
        if self.draining:
            raise Overloaded("the server is stopping; retry on another instance or after the restart.",
                             retry_after=5)
        self.in_flight += 1
        self.unqueued += 1
        done = False

        def queued() -> None:
            nonlocal done
            if not done:
                done = True
                self.unqueued -= 1

        try:
            yield queued
        finally:
            queued()
            self.in_flight -= 1


# request / response schemas (for the OpenAPI document; bodies are parsed by hand) --------------
class PredictJSON(BaseModel):
    """One sample; give any subset of the model's modalities."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="the text input")
    image: str | None = Field(None, description="an image file (PNG/JPEG/GIF/BMP/WEBP/TIFF), base64; a data: URL "
                                                "is accepted")
    audio: str | None = Field(None, description="an audio file (WAV/FLAC/OGG), base64; a data: URL is accepted")


class PredictForm(BaseModel):
    text: str | None = Field(None, description="the text input")
    image: bytes | None = Field(None, json_schema_extra={"format": "binary"}, description="an image file")
    audio: bytes | None = Field(None, json_schema_extra={"format": "binary"}, description="an audio file")


class BatchJSON(BaseModel):
    items: list[PredictJSON] = Field(description="samples, each with any subset of the model's modalities")


class Prediction(BaseModel):
    """What ``FusionModel.predict`` returns for one sample, plus the modalities that were given."""

    model_config = ConfigDict(extra="allow")
    label: str | None = Field(None, description="the predicted class (multiclass)")
    labels: list[str] | None = Field(None, description="the predicted classes (multilabel)")
    probs: dict[str, float] | None = Field(None, description="probability of each class")
    values: dict[str, float] | None = Field(None, description="the outputs (regression)")
    explain: dict[str, Any] | None = Field(None, description="the head's own weights, e.g. gates per modality")
    inputs: list[str] = Field(description="the modalities this prediction used")


class ItemError(BaseModel):
    """A /predict/batch item that could not be predicted (the batch's other items were)."""

    error: str = Field(description="why this item was not predicted")


class BatchPrediction(BaseModel):
    predictions: list[Prediction | ItemError]


class ErrorDetail(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorDetail, "description": "an input is over a limit (bytes, image pixels, audio seconds, "
                                               "text characters, batch items); the detail names it"},
    415: {"model": ErrorDetail, "description": "the body is neither multipart/form-data nor application/json"},
    422: {"model": ErrorDetail, "description": "an input is unusable (no input, unknown field, bad base64, "
                                               "unreadable file, a modality the model lacks)"},
    503: {"model": ErrorDetail, "description": "the queue is full or the server is stopping; see Retry-After"},
    504: {"model": ErrorDetail, "description": "no prediction within the request timeout"},
}


def _body_schema(json_model: type[BaseModel], form: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": json_model.model_json_schema()}}
    if form:
        content["multipart/form-data"] = {"schema": PredictForm.model_json_schema()}
        content["application/x-www-form-urlencoded"] = {"schema": json_model.model_json_schema()}
    return {"requestBody": {"required": True, "content": content}}


# the body-size limit -----------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (Content-Length checked first, then counted)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (f"the request body is {size}; the limit is {self.max_bytes} bytes (max_request_bytes, "
                "--max-request-mb); send smaller files.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await JSONResponse({"detail": self._message(f"{int(length)} bytes")}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise LimitError(self._message(f"over {self.max_bytes} bytes"))
            return message

        await self.app(scope, limited, send)


# the model ---------------------------------------------------------------------------------------
def model_summary(model: Any, name: str, source: str | None = None) -> dict[str, Any]:
    """Config summary, labels, modalities, encoders, card metrics and card text of a loaded model."""
    cfg = model.config
    out: dict[str, Any] = {
        "name": name,
        "task": cfg.task,
        "labels": list(cfg.labels),
        "modalities": list(model.modalities),
        "stage": cfg.stage,
        "fusion_head": cfg.fusion_head,
        "head_options": dict(cfg.head_options or {}),
        "encoders": {m: {"name": spec.name, "finetune": spec.finetune} for m, spec in cfg.encoders.items()},
        "metrics": {},
        "card": "",
    }
    folder = Path(source).expanduser() if source else None
    if folder is not None and (folder / "config.json").is_file():
        doc = json.loads((folder / "config.json").read_text())
        card = folder / "README.md"
        out.update(metrics=doc.get("metrics") or {}, dataset=doc.get("dataset"),
                   card=card.read_text() if card.is_file() else "")
    return out


def batch_predictor(model: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Samples (``{modality: input}``, any subsets) -> one ``model.predict`` call over the whole batch."""

    def run(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        given = [m for m in model.modalities if any(m in s for s in samples)]
        # fold=False: `serve` folded the model once at start (optimize_for_serving), or was told not to (--no-fuse)
        rows = model.predict(**{m: [s.get(m) for s in samples] for m in given}, batch_size=max(1, len(samples)),
                             fold=False)
        for row, s in zip(rows, samples, strict=True):
            row["inputs"] = [m for m in model.modalities if m in s]
        return rows

    return run


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _page(name: str) -> bytes:
    return resources.files("zoo.serve").joinpath("static", name).read_bytes()


# the app -----------------------------------------------------------------------------------------
def create_app(model: Any, *, name: str = "model", source: str | None = None, config: ServeConfig | None = None,
               predict_batch: Callable[[list[dict[str, Any]]], Sequence[Any]] | None = None) -> FastAPI:
    """The FastAPI app serving ``model``.

    Args:
        model: a loaded ``FusionModel`` (eval mode).
        name: shown on the page and by ``GET /model``.
        source: the checkpoint folder, read for the card and its metrics.
        config: batching, queue, timeout and size limits.
        predict_batch: replaces ``model.predict`` over a batch of samples (a list of ``{modality: input}``
            -> a list of result dicts); for custom pipelines and tests.
    """
    cfg = config or ServeConfig()
    limits = cfg.limits
    summary = model_summary(model, name, source)
    summary["limits"] = limits.as_dict()
    summary["serving"] = {k: v for k, v in cfg.as_dict().items() if k != "limits"}
    batcher = DynamicBatcher(predict_batch or batch_predictor(model), max_batch_size=cfg.max_batch_size,
                             max_wait_s=cfg.max_wait_ms / 1000.0, max_queue=cfg.max_queue)
    started = time.monotonic()
    gate = Gate()
    index_html, app_js = _page("index.html"), _page("app.js")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        log.info("serving %s (%s) with batches of up to %d", name, ", ".join(model.modalities), cfg.max_batch_size)
        yield
        # uvicorn has stopped accepting connections and waited for the open requests; finish what is queued
        done = await asyncio.to_thread(batcher.close, cfg.request_timeout_s)
        log.info("batcher stopped (%s)", "drained" if done else "timed out with work left")

    app = FastAPI(title=f"fusion-zoo: {name}", version="1", lifespan=lifespan,
                  summary="Predictions of a fused text/image/audio model.",
                  docs_url="/docs" if cfg.swagger_ui else None, redoc_url=None)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_request_bytes)
    app.state.batcher = batcher
    app.state.gate = gate
    app.state.summary = summary

    @app.exception_handler(LimitError)
    async def _limit(_: Request, e: LimitError) -> JSONResponse:
        return _error(413, str(e))

    @app.exception_handler(InputError)
    async def _input(_: Request, e: InputError) -> JSONResponse:
        return _error(422, str(e))

    # an overloaded server says when to come back, and never later than a quarter of the request timeout
    retry_cap = max(1, int(cfg.request_timeout_s / 4))
    queue_wait = cfg.queue_wait_s

    @contextlib.contextmanager
    def admitted() -> Iterator[Callable[[], None]]:
        """A prediction request enters only when the work ahead of it (queued, running, and other requests still
        being read or decoded) is expected to take at most ``queue_wait`` seconds; else 503 at once."""
        expected = batcher.expected_wait_s(gate.unqueued + 1)
        if expected > queue_wait and not gate.draining:
            batcher.stats.busy_rejections += 1
            raise Overloaded(f"the server is busy: {gate.in_flight} requests are open, about {expected:.1f} s of "
                             f"work, more than the {queue_wait:g} s a request may wait (--max-queue-wait); retry "
                             "after the Retry-After seconds.", retry_after=math.ceil(expected - queue_wait))
        with gate.request() as queued:
            yield queued

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, e: Overloaded) -> JSONResponse:
        return _error(503, str(e), {"Retry-After": str(min(e.retry_after, retry_cap))})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in e.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        hint = {404: " (endpoints: /, /health, /model, /predict, /predict/batch, /openapi.json)",
                405: " (POST /predict and /predict/batch; GET the others)"}.get(e.status_code, "")
        return _error(e.status_code, f"{e.detail}{hint}", dict(e.headers or {}))

    @app.exception_handler(FusionZooError)
    async def _ours(_: Request, e: FusionZooError) -> JSONResponse:
        return _error(422, str(e))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("prediction failed")
        return _error(500, f"the server failed on this request ({type(e).__name__}); the server log has the "
                           "details. Check the inputs, or report it with the log.")

    async def run(samples: list[dict[str, Any]], queued: Callable[[], None]) -> list[dict[str, Any]]:
        jobs = batcher.enqueue(samples)
        queued()
        try:
            return await asyncio.wait_for(batcher.wait(jobs), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise _Timeout(f"no prediction within the request timeout of {cfg.request_timeout_s:g} s "
                           f"({batcher.depth} samples queued); retry later or raise --timeout.") from None

    @app.exception_handler(_Timeout)
    async def _timeout(_: Request, e: _Timeout) -> JSONResponse:
        return _error(504, str(e))

    async def body_of(request: Request) -> tuple[str, bytes]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in _BODY_TYPES:
            raise _Unsupported(f"Content-Type {kind or '(none)'!r} is not supported; send multipart/form-data "
                               "(text field, image/audio files) or application/json (image/audio as base64).")
        return kind, await request.body()

    @app.exception_handler(_Unsupported)
    async def _unsupported(_: Request, e: _Unsupported) -> JSONResponse:
        return _error(415, str(e))

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse(index_html, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})

    @app.get("/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(app_js, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.get("/health", summary="liveness, queue depth and batching counters")
    async def health() -> JSONResponse:
        stopping = batcher.closing or gate.draining
        body = {"status": "stopping" if stopping else "ok", "model": name, "in_flight": gate.in_flight,
                "waiting_for_slot": waiting, "queue_depth": batcher.depth, "queue_limit": batcher.max_queue,
                "uptime_s": round(time.monotonic() - started, 3), **batcher.stats.as_dict()}
        return JSONResponse(body, status_code=503 if stopping else 200)

    @app.get("/model", summary="config summary, labels, modalities, card metrics and limits")
    async def model_info() -> dict[str, Any]:
        return summary

    # bodies are read, parsed and decoded by at most this many requests at once: memory stays bounded by
    # slots x max_request_bytes. The wait for a slot is part of the bounded queue: a request that gets none within
    # SLOT_WAIT_S is answered 503 + Retry-After at once, instead of waiting unseen for up to the request timeout
    slots = asyncio.Semaphore(max(2, 2 * cfg.max_batch_size))
    waiting = 0  # requests waiting for a slot now (GET /health)

    @contextlib.asynccontextmanager
    async def slot() -> AsyncIterator[None]:
        nonlocal waiting
        waiting += 1
        try:
            await asyncio.wait_for(slots.acquire(), SLOT_WAIT_S)
        except asyncio.TimeoutError:
            batcher.stats.busy_rejections += 1
            raise Overloaded(f"the server is busy: every request slot stayed taken for {SLOT_WAIT_S:g} s and "
                             f"{batcher.depth} samples are queued; retry after 1 s.", retry_after=1) from None
        finally:
            waiting -= 1
        try:
            yield
        finally:
            slots.release()

    image_encoder = model.encoders["image"] if "image" in model.encoders else None
    image_side = getattr(getattr(image_encoder, "preprocessor", None), "decode_side", None)  # JPEGs as training

    def one_sample(kind: str, content_type: str, body: bytes) -> dict[str, Any]:
        raw: dict[str, bytes | str]
        if kind == "multipart/form-data":
            raw = parse_multipart(body, content_type)
        elif kind == "application/json":
            raw = parse_json_sample(parse_json(body))
        else:
            raw = parse_urlencoded(body)
        return decode_sample(raw, model.modalities, limits, image_side=image_side)

    def many_samples(body: bytes) -> list[dict[str, Any] | InputError]:
        """The batch's samples; an unusable item becomes its error (the others are still predicted)."""
        doc = parse_json(body)
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items or set(doc) != {"items"}:
            raise InputError("the body must be {\"items\": [sample, ...]} with at least one sample, each like "
                             "{\"text\": \"...\", \"image\": \"<base64>\", \"audio\": \"<base64>\"}.")
        if len(items) > limits.max_batch_items:
            raise LimitError(f"the batch has {len(items)} items; the limit is {limits.max_batch_items} "
                             "(max_batch_items, --max-batch-items); split it into several requests.")
        out: list[dict[str, Any] | InputError] = []
        for i, x in enumerate(items):
            try:
                out.append(decode_sample(parse_json_sample(x, f"items[{i}]"), model.modalities, limits, f"items[{i}]",
                                         image_side))
            except InputError as e:  # LimitError too: this item alone is over a limit
                out.append(e)
        return out

    @app.post("/predict", summary="predict one sample from any subset of text, image and audio",
              response_model=Prediction, response_model_exclude_none=True, responses=_ERRORS,
              openapi_extra=_body_schema(PredictJSON, form=True))
    async def predict(request: Request) -> Any:
        with admitted() as queued:
            async with slot():
                kind, body = await body_of(request)
                sample = await run_in_threadpool(one_sample, kind, request.headers["content-type"], body)
                del body
            return (await run([sample], queued))[0]

    @app.post("/predict/batch", summary="predict several samples (JSON, image/audio as base64)",
              response_model=BatchPrediction, response_model_exclude_none=True, responses=_ERRORS,
              openapi_extra=_body_schema(BatchJSON, form=False))
    async def predict_batch_(request: Request) -> Any:
        with admitted() as queued:
            async with slot():
                kind, body = await body_of(request)
                if kind != "application/json":
                    raise _Unsupported("POST /predict/batch takes application/json {\"items\": [{\"text\": ..., "
                                       "\"image\": <base64>, \"audio\": <base64>}, ...]}; for one sample use "
                                       "POST /predict.")
                parsed = await run_in_threadpool(many_samples, body)
                del body
            good = [x for x in parsed if not isinstance(x, InputError)]
            if not good:  # nothing to predict: the request itself is unusable
                raise InputError("no item of the batch is usable: " + "; ".join(str(e) for e in parsed[:3])
                                 + (f" (and {len(parsed) - 3} more)" if len(parsed) > 3 else ""))
            results = iter(await run(good, queued))
        return {"predictions": [{"error": str(x)} if isinstance(x, InputError) else next(results) for x in parsed]}

    return app


class _Timeout(Exception):
    """A request waited longer than the request timeout (HTTP 504)."""


class _Unsupported(Exception):
    """A body in a media type the endpoint does not take (HTTP 415)."""
