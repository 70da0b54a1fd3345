"""An image encoder's CPU batches run through a frozen, oneDNN-optimized TorchScript graph per input shape
(:class:`GraphEncode`), checked against the eager encoder on the first batch of every batch size.

Opt-in (``inference_copy(graph=True)``): faster on some CPUs, but its features may differ from the plain encoder's
by more than the 1e-4 that inference paths promise. TorchScript is deprecated in torch 2.11; where it is missing or
a graph fails, the encoder runs eagerly.
"""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from encoders import Encoder, ModalityOutput

from ._surgery import max_diff

__all__ = ["GraphEncode", "graph_available", "GRAPH_AFTER_CALLS", "GRAPH_MAX_SHAPES"]

#: calls with one input shape before :class:`GraphEncode` builds its graph (a single prediction never pays for one)
GRAPH_AFTER_CALLS = 2
#: distinct input shapes one :class:`GraphEncode` keeps a graph for: each graph holds its own copy of the weights (an
#: image preprocessor makes one size, so one graph is the usual case); further shapes run eagerly
GRAPH_MAX_SHAPES = 2


def graph_available() -> bool:
    """Whether this torch can build :class:`GraphEncode` graphs (TorchScript trace, freeze, optimize)."""
    return all(callable(getattr(torch.jit, name, None)) for name in ("trace", "freeze", "optimize_for_inference"))


class _EncodeTensors(nn.Module):
    """``encoder.encode({"pixel_values": x})`` as a tensor-in, tuple-out module that ``torch.jit.trace`` takes.

    The encoder is held in a list, not as a submodule: the trace then inlines it with its weights as constants
    instead of building a ScriptModule for each of its submodules, which makes tracing several times faster.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.held = [encoder]

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # [B, C, H, W] -> tokens, mask, pooled
        encoder = self.held[0]
        out = type(encoder).encode(encoder, {"pixel_values": pixels})  # the class's encode, not GraphEncode
        return out.tokens, out.mask, out.pooled


_GraphKey = tuple[tuple[int, ...], torch.dtype]


class GraphEncode:
    """An image encoder's ``encode`` that runs CPU batches through a frozen, oneDNN-optimized TorchScript graph.

    Installed on a folded inference copy by :func:`zoo.optimize.inference_copy`
    (``encoder.encode = GraphEncode(encoder)``).
    A batch that holds only ``pixel_values`` (plus ``present``, which ``Encoder.forward`` applies) on CPU is
    counted by its shape without the batch dim; from the ``after``-th such call on (default
    :data:`GRAPH_AFTER_CALLS`; the feature cache, which runs many batches of one shape, builds at once), it runs a
    graph traced for that shape (graphs take any batch size but bake in the image size). The first batch of each
    batch size is also run eagerly and compared (``atol``); a graph that fails to build or to match is dropped
    for that shape, which then always runs eagerly. Anything else runs the encoder's own ``encode``.
    """

    def __init__(self, encoder: Encoder, atol: float = 1e-4, after: int = GRAPH_AFTER_CALLS) -> None:
        self.encoder = encoder
        self.atol = atol
        self.after = max(1, int(after))
        self._graphs: dict[_GraphKey, Any] = {}  # key -> a ScriptModule, or None when the graph failed
        self._calls: dict[_GraphKey, int] = {}
        self._checked: set[tuple[_GraphKey, int]] = set()
        # (shape, batch size) -> set when its first check is done: chunks run in parallel threads, and a second
        # batch of a size being checked waits for the verdict instead of running an unchecked graph
        self._checking: dict[tuple[_GraphKey, int], threading.Event] = {}
        self._weights: tuple[tuple[int, int], ...] | None = None  # the weights the graphs were built from
        self._lock = threading.Lock()  # a server may call from several threads

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphEncode:
        return GraphEncode(copy.deepcopy(self.encoder, memo), self.atol, self.after)  # graphs hold old weights: rebuild

    def _eager(self, batch: dict[str, Tensor]) -> ModalityOutput:
        return type(self.encoder).encode(self.encoder, batch)

    def _build(self, pixels: Tensor) -> Any:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the deprecation notice and the tracer's shape-to-int notes cannot be acted on by users: the image
            # size is part of the graph's key, and every batch size is checked below
            warnings.simplefilter("ignore")
            example = pixels[:1].clone()  # graphs take any batch size; one image traces fastest
            traced = torch.jit.trace(_EncodeTensors(self.encoder).eval(), example, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def _weights_state(self) -> tuple[tuple[int, int], ...] | None:
        """(version, storage) of every weight, or None when one is off the CPU: a graph holds a snapshot of the
        weights, so any in-place change (training, ``load_state_dict``) or move drops the graphs."""
        state = []
        for t in (*self.encoder.parameters(), *self.encoder.buffers()):
            if t.device.type != "cpu":
                return None
            state.append((-1 if t.is_inference() else t._version, t.data_ptr()))  # inference tensors have none
        return tuple(state)

    def __call__(self, batch: dict[str, Tensor]) -> ModalityOutput:
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.device.type != "cpu" \
                or set(batch) - {"pixel_values", "present"} or torch.is_grad_enabled() or not graph_available():
            return self._eager(batch)
        key: _GraphKey = (tuple(pixels.shape[1:]), pixels.dtype)
        n = int(pixels.shape[0])
        while True:
            weights = self._weights_state()  # again after a wait: the weights may have changed meanwhile
            if weights is None:
                return self._eager(batch)
            with self._lock:  # decide (and build) under the lock; run outside it
                if weights != self._weights:
                    self._graphs, self._calls, self._checked, self._weights = {}, {}, set(), weights
                    self._checking = {}
                graph = self._graphs.get(key)
                if key not in self._graphs:
                    self._calls[key] = calls = self._calls.get(key, 0) + 1
                    if calls >= self.after and len(self._graphs) < GRAPH_MAX_SHAPES:
                        try:
                            graph = self._build(pixels)
                        except Exception:  # noqa: BLE001 - any failure to trace or optimize means: run eagerly
                            graph = None
                        self._graphs[key] = graph
                check = graph is not None and (key, n) not in self._checked
                pending = self._checking.get((key, n)) if check else None
                mine = None
                if check and pending is None:
                    mine = self._checking[(key, n)] = threading.Event()  # this call checks the size
            if pending is None:
                break
            pending.wait()  # another thread is checking this size: use its verdict
        if graph is None:
            return self._eager(batch)
        try:
            out = ModalityOutput(*graph(pixels))
        except Exception:  # noqa: BLE001 - a graph that cannot run this batch is dropped for its shape
            out = None
        if out is None or check:
            same = False
            try:
                expected = self._eager(batch)
                same = out is not None and all(
                    a.shape == b.shape and a.dtype == b.dtype for a, b in
                    zip((out.tokens, out.mask, out.pooled), (expected.tokens, expected.mask, expected.pooled),
                        strict=True)
                ) and torch.equal(out.mask, expected.mask) and max_diff(out, expected) <= self.atol
            finally:  # waiters are released whatever happens; a failed check drops the graph for the shape
                with self._lock:
                    if weights == self._weights:  # not a verdict on weights that changed meanwhile
                        if same:
                            self._checked.add((key, n))
                        else:
                            self._graphs[key] = None
                    if mine is not None and self._checking.get((key, n)) is mine:
                        del self._checking[(key, n)]
                if mine is not None:
                    mine.set()
            if not same:
                return expected
        assert out is not None  # a graph that failed to run was checked (and dropped) above
        return out
