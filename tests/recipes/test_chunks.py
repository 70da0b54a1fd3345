"""The chunk pool of the feature cache (recipes/chunks.py): CPU image batches in chunks, side by side on worker
threads, with the outputs of one whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import recipes.chunks as chunks
from encoders import create_encoder
from fusion_errors import InputError
from zoo.optimize import example_image_batch, inference_copy


class _RecordingEncoder(nn.Module):
    """Scales each image by 2 and records (thread id, intra-op threads, inference mode) of every call; its
    first ``meet`` calls wait for each other, so they cannot run one after another on one thread."""

    def __init__(self, meet: int = 0) -> None:
        super().__init__()
        import threading

        self.calls: list[tuple[int, int, bool]] = []
        self.meeting = threading.Barrier(meet, timeout=20) if meet else None

    def forward(self, batch: dict[str, torch.Tensor]):
        import threading

        from encoders import ModalityOutput

        self.calls.append((threading.get_ident(), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        if self.meeting is not None and len(self.calls) <= self.meeting.parties:
            self.meeting.wait()
        pixels = batch["pixel_values"]  # [B, C, H, W]
        pooled = pixels.flatten(1)[:, :4] * 2  # [B, 4]
        return ModalityOutput(pooled[:, None], torch.ones(len(pixels), 1, dtype=torch.bool), pooled)


def test_chunks_run_side_by_side_on_worker_threads_in_order(monkeypatch) -> None:
    import threading

    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 3 * 8 * 8)  # chunks of 3, 3, 3, 1 images
    monkeypatch.setattr(chunks, "CHUNK_WORKERS", 2)
    monkeypatch.setattr(chunks, "_chunk_pools", {})  # a fresh pool: its workers set their own thread counts
    pixels = torch.arange(10 * 3 * 8 * 8, dtype=torch.float32).reshape(10, 3, 8, 8)
    enc = _RecordingEncoder(meet=2)  # the first two chunks must meet: one thread alone would time out
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # the workers get 2 each
    seen: list[int] = []
    try:
        with torch.inference_mode():
            out = chunks.run_in_chunks(enc, {"pixel_values": pixels}, "cpu")
        assert torch.get_num_threads() == 4
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.pooled, pixels.flatten(1)[:, :4] * 2, rtol=0, atol=0)  # every row, in order
    assert out.tokens.shape == (10, 1, 4) and out.mask.all()
    assert len(enc.calls) == 4 and len({c[0] for c in enc.calls}) == 2 and threading.get_ident() not in {
        c[0] for c in enc.calls}
    assert all(c[1] == 2 and c[2] for c in enc.calls)  # its share of the caller's 4 threads; the caller's mode
    assert seen == [4]  # a thread started afterwards gets the process's count, not a worker's


def test_chunks_with_grad_or_one_worker_run_on_the_callers_thread(monkeypatch) -> None:
    import threading

    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 3 * 8 * 8)
    pixels = torch.randn(7, 3, 8, 8, requires_grad=True)
    for workers, grad in ((2, True), (1, False)):
        monkeypatch.setattr(chunks, "CHUNK_WORKERS", workers)
        enc = _RecordingEncoder()
        with torch.set_grad_enabled(grad):
            out = chunks.run_in_chunks(enc, {"pixel_values": pixels}, "cpu")
        assert {c[0] for c in enc.calls} == {threading.get_ident()} and len(enc.calls) == 3
        assert out.pooled.requires_grad is grad


def test_a_failing_chunk_raises_in_the_caller(monkeypatch) -> None:
    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 2 * 8 * 8)
    monkeypatch.setattr(chunks, "CHUNK_WORKERS", 2)

    class Broken(_RecordingEncoder):
        def forward(self, batch):
            if float(batch["pixel_values"][0, 0, 0, 0]) == 4:  # the third chunk
                raise InputError("chunk three is broken")
            return super().forward(batch)

    pixels = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 8, 8)
    with torch.no_grad(), pytest.raises(InputError, match="chunk three"):
        chunks.run_in_chunks(Broken(), {"pixel_values": pixels}, "cpu")


def _chunks_in_child(queue) -> None:
    chunks.CHUNK_PIXELS, chunks.CHUNK_WORKERS = 2 * 8 * 8, 2
    with torch.no_grad():
        out = chunks.run_in_chunks(_RecordingEncoder(), {"pixel_values": torch.ones(6, 3, 8, 8)}, "cpu")
    queue.put(float(out.pooled.sum()))


def test_a_forked_child_gets_its_own_chunk_workers(monkeypatch) -> None:
    import multiprocessing

    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 2 * 8 * 8)
    monkeypatch.setattr(chunks, "CHUNK_WORKERS", 2)
    with torch.no_grad():
        chunks.run_in_chunks(_RecordingEncoder(), {"pixel_values": torch.ones(6, 3, 8, 8)}, "cpu")  # pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_chunks_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == 6 * 4 * 2  # the parent's dead pool would hang it


@pytest.mark.slow
def test_efficientnet_chunks_on_workers_equal_one_after_another(monkeypatch) -> None:
    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 2 * 96 * 96)
    enc = create_encoder("efficientnet-lite0", finetune="frozen").eval()
    folded = inference_copy(enc)[0]
    batch = example_image_batch(enc, batch_size=7, size=96)
    outs = {}
    for workers in (1, 2):
        monkeypatch.setattr(chunks, "CHUNK_WORKERS", workers)
        with torch.inference_mode():
            outs[workers] = (chunks.run_in_chunks(enc, batch, "cpu").pooled,
                             chunks.run_in_chunks(folded, batch, "cpu").pooled)
    for a, b in zip(outs[1], outs[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_chunk_pools_are_reused_per_size_and_bounded(monkeypatch) -> None:
    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 2 * 8 * 8)  # chunks of 2 images
    monkeypatch.setattr(chunks, "CHUNK_WORKERS", 3)
    monkeypatch.setattr(chunks, "_chunk_pools", {})
    threads: dict[int, set[int]] = {}
    with torch.no_grad():
        for images in (4, 6, 4, 6):  # 2 chunks (a pool of 2 workers), then 3 (a pool of 3), twice
            enc = _RecordingEncoder()
            chunks.run_in_chunks(enc, {"pixel_values": torch.ones(images, 3, 8, 8)}, "cpu")
            threads.setdefault(images, set()).update(c[0] for c in enc.calls)
    assert sorted(chunks._chunk_pools) == [(2, 1), (3, 1)]
    assert len(threads[4]) <= 2 and len(threads[6]) <= 3  # the second batches ran on the same pools' threads
    monkeypatch.setattr(chunks, "CHUNK_WORKERS", 8)
    with torch.no_grad():
        for images in range(8, 17, 2):  # pools of 4 .. 8 workers: only the last _CHUNK_POOLS_KEPT stay
            chunks.run_in_chunks(_RecordingEncoder(), {"pixel_values": torch.ones(images, 3, 8, 8)}, "cpu")
    assert sorted(chunks._chunk_pools) == [(5, 1), (6, 1), (7, 1), (8, 1)]


def test_a_pool_dropped_from_the_kept_ones_still_runs_its_callers_chunks(monkeypatch) -> None:
    monkeypatch.setattr(chunks, "_chunk_pools", {})
    pool = chunks._workers_pool(2, 1)
    for workers in range(3, 3 + chunks._CHUNK_POOLS_KEPT):  # another caller's pools push it out
        chunks._workers_pool(workers, 1)
    assert (2, 1) not in chunks._chunk_pools
    assert list(pool.map(lambda i: i * 2, range(4))) == [0, 2, 4, 6]  # not shut down under its caller
