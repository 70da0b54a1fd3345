"""GraphEncode (zoo/graph.py): the folded copy run as a frozen TorchScript graph on CPU, checked against eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import create_encoder
from zoo.graph import GRAPH_AFTER_CALLS, GraphEncode
from zoo.optimize import INFERENCE_TAG_FOLDED, INFERENCE_TAG_GRAPH, inference_copy


def _max_diff(a, b) -> float:
    return max(float((a.tokens - b.tokens).abs().max()), float((a.pooled - b.pooled).abs().max()))


@pytest.fixture
def frozen_tiny(randomise_norms) -> nn.Module:
    torch.manual_seed(0)
    enc = create_encoder("tiny-image", finetune="frozen").eval()
    randomise_norms(enc)
    return enc


def _pixels(n: int, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))}


def test_graph_is_built_after_repeated_shapes_and_matches_the_original_at_every_batch_size(frozen_tiny) -> None:
    enc = frozen_tiny
    assert inference_copy(enc)[1] == "bnfold-cl"  # the graph is opt-in
    copy_, tag = inference_copy(enc, graph=True)
    assert tag == INFERENCE_TAG_GRAPH and isinstance(copy_.encode, GraphEncode)
    runner = copy_.encode
    key = ((3, 32, 32), torch.float32)
    with torch.inference_mode():
        copy_(_pixels(4))
        assert GRAPH_AFTER_CALLS > 1 and key not in runner._graphs  # one call (a single prediction) builds nothing
        for _ in range(GRAPH_AFTER_CALLS - 1):
            copy_(_pixels(4))
        assert isinstance(runner._graphs[key], torch.jit.ScriptModule)
        for n, seed in ((4, 1), (1, 2), (7, 3), (7, 4)):  # other batch sizes run the same graph
            batch = _pixels(n, seed=seed)
            got, want = copy_(batch), enc(batch)
            assert got.tokens.shape == want.tokens.shape and torch.equal(got.mask, want.mask)
            assert _max_diff(got, want) <= 1e-4
        assert runner._graphs[key] is not None and {b for (_, b) in runner._checked} == {4, 1, 7}
        other = _pixels(2, size=40)  # another image size gets its own graph
        for _ in range(GRAPH_AFTER_CALLS):
            got = copy_(other)
        assert isinstance(runner._graphs[((3, 40, 40), torch.float32)], torch.jit.ScriptModule)
        assert _max_diff(got, enc(other)) <= 1e-4


def test_a_graph_that_fails_to_build_or_to_match_is_dropped_for_eager_runs(monkeypatch, frozen_tiny) -> None:
    enc = frozen_tiny
    copy_ = inference_copy(enc, graph=True)[0]
    runner = copy_.encode
    assert isinstance(runner, GraphEncode)
    key = ((3, 32, 32), torch.float32)
    batch = _pixels(3)
    with torch.inference_mode():
        want = enc(batch)

        def broken(*_a, **_k):
            raise RuntimeError("cannot trace")

        monkeypatch.setattr(torch.jit, "trace", broken)
        for _ in range(GRAPH_AFTER_CALLS + 1):
            assert _max_diff(copy_(batch), want) <= 1e-4
        assert key in runner._graphs and runner._graphs[key] is None
        monkeypatch.undo()

        wrong = GraphEncode(inference_copy(enc)[0])  # a graph whose outputs are off by 1
        real_build = wrong._build

        def off_by_one(pixels):
            graph = real_build(pixels)
            return lambda x: tuple(t + 1 if t.is_floating_point() else t for t in graph(x))

        monkeypatch.setattr(wrong, "_build", off_by_one)
        for _ in range(GRAPH_AFTER_CALLS + 2):
            assert _max_diff(wrong(batch), want) <= 1e-4  # the eager result, never the wrong one
        assert wrong._graphs[key] is None


def test_graphs_stay_out_of_grad_mode_export_and_copies(frozen_tiny) -> None:
    import copy

    enc = frozen_tiny
    plain_graph = inference_copy(enc)
    assert plain_graph[1] == INFERENCE_TAG_FOLDED and not isinstance(plain_graph[0].encode, GraphEncode)
    copy_ = inference_copy(enc, graph=True)[0]
    runner = copy_.encode
    for _ in range(GRAPH_AFTER_CALLS + 1):
        with torch.enable_grad():
            runner(_pixels(2))  # autograd on: the eager encode
    assert runner._graphs == {}
    with torch.inference_mode():
        for _ in range(GRAPH_AFTER_CALLS):
            copy_(_pixels(2))
    assert runner._graphs
    twin = copy.deepcopy(copy_)
    assert isinstance(twin.encode, GraphEncode) and twin.encode.encoder is twin and twin.encode._graphs == {}
    with torch.inference_mode():
        assert _max_diff(twin(_pixels(2, seed=5)), enc(_pixels(2, seed=5))) <= 1e-4


def test_a_graph_is_rebuilt_when_the_encoders_weights_change_in_place(frozen_tiny) -> None:
    enc = frozen_tiny
    copy_ = inference_copy(enc, graph=True)[0]
    runner = copy_.encode
    assert isinstance(runner, GraphEncode)
    batch = _pixels(3)
    with torch.inference_mode():
        for _ in range(GRAPH_AFTER_CALLS):
            copy_(batch)
        first = next(iter(runner._graphs.values()))
        assert first is not None
    with torch.no_grad():
        for p in copy_.parameters():
            p.mul_(1.5)  # e.g. a user trains or loads new weights into a model served with graphs
    with torch.inference_mode():
        got = copy_(batch)  # not the stale graph's answer
        want = type(copy_).encode(copy_, batch)
        assert _max_diff(got, want) <= 1e-4
        for _ in range(GRAPH_AFTER_CALLS):
            copy_(batch)
        assert next(iter(runner._graphs.values())) is not first



def test_parallel_batches_of_one_size_are_checked_once_and_wait_for_the_verdict(monkeypatch, frozen_tiny) -> None:
    """The feature cache runs chunks in parallel threads: two batches of a size not yet checked used to both run
    the eager check (or, had the first claimed it, the second would have returned an unchecked graph output)."""
    import threading

    graph = GraphEncode(frozen_tiny, after=1)
    calls: list[int] = []
    eager = GraphEncode._eager
    monkeypatch.setattr(GraphEncode, "_eager",
                        lambda self, b: calls.append(int(b["pixel_values"].shape[0])) or eager(self, b))
    x = torch.randn(3, 3, 32, 32)
    outs = []

    def run() -> None:
        with torch.no_grad():
            outs.append(graph({"pixel_values": x}))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [3] and len(outs) == 8
    with torch.no_grad():
        want = eager(graph, {"pixel_values": x})
    for out in outs:
        torch.testing.assert_close(out.pooled, want.pooled, rtol=0, atol=1e-4)


def test_a_batch_waiting_for_a_check_is_released_when_the_weights_change_meanwhile(monkeypatch, frozen_tiny) -> None:
    """A check outlived by a change of weights (and a new check for the new weights) still wakes the batches that
    waited for it: they were left waiting forever when the check released the new weights' waiters instead."""
    import threading
    import time

    graph = GraphEncode(frozen_tiny, after=1)
    x = torch.randn(3, 3, 32, 32)
    in_check, release, first = threading.Event(), threading.Event(), []
    eager = GraphEncode._eager

    def slow_first_check(self, b):
        if not first:  # the first check holds until the weights have changed and been checked again
            first.append(1)
            in_check.set()
            release.wait(60)
        return eager(self, b)

    monkeypatch.setattr(GraphEncode, "_eager", slow_first_check)
    outs: list = []

    def run() -> None:
        with torch.no_grad():
            outs.append(graph({"pixel_values": x}))

    checker = threading.Thread(target=run, daemon=True)
    checker.start()
    assert in_check.wait(60)
    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    time.sleep(0.5)  # the waiter reaches the first check's verdict and waits for it
    with torch.no_grad():
        for p in frozen_tiny.parameters():
            p.mul_(1.5)  # new weights: the next call starts over and checks them itself
        run()
    release.set()
    checker.join(60)
    waiter.join(30)
    assert not waiter.is_alive() and not checker.is_alive() and len(outs) == 3
    with torch.no_grad():
        want = eager(graph, {"pixel_values": x})
    for out in outs:  # every call answers with the new weights
        torch.testing.assert_close(out.pooled, want.pooled, rtol=0, atol=1e-4)
