"""CPU image batches of the feature cache in chunks that fit the CPU caches, run side by side on a process-wide
pool of worker threads, each with its share of torch's intra-op threads."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import torch
from torch import Tensor, nn

from encoders import ModalityOutput

__all__ = ["CHUNK_PIXELS", "CHUNK_WORKERS", "cpu_chunk_size", "chunk_workers", "run_in_chunks"]

#: pixels per image chunk on CPU (64 images of 64 x 64; 5 of 224 x 224): a CNN's early activations for the chunk
#: then stay in the CPU caches instead of streaming through memory (docs/benchmarks.md has the measurements)
CHUNK_PIXELS = 64 * 64 * 64


def cpu_chunk_size(batch: dict[str, Tensor], device: torch.device | str) -> int | None:
    """Images per chunk for an image batch (``pixel_values`` [B, C, H, W]) run on CPU, or None to run it whole
    (other devices, other modalities, or a batch already at most that size)."""
    pixels = batch.get("pixel_values")
    if torch.device(device).type != "cpu" or not isinstance(pixels, Tensor) or pixels.dim() != 4:
        return None
    chunk = max(1, CHUNK_PIXELS // max(1, pixels.shape[-2] * pixels.shape[-1]))
    return chunk if chunk < pixels.shape[0] else None


#: worker threads that run a CPU batch's chunks side by side, each chunk on its share of torch's intra-op threads
#: (None: one worker per intra-op thread; 1: one chunk after another on all of them). Without grad only.
CHUNK_WORKERS: int | None = None

#: worker pools by (workers, intra-op threads per worker); a batch with fewer chunks than workers uses a smaller
#: pool rather than rebuilding one, and the few pools kept are idle threads
_chunk_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_CHUNK_POOLS_KEPT = 4
_chunk_pool_lock = threading.Lock()


def chunk_workers(chunks: int) -> int:
    """Worker threads for ``chunks`` chunks: :data:`CHUNK_WORKERS` (default: torch's intra-op threads), at most one
    per chunk, 1 while grad is enabled (autograd graphs stay on the caller's thread)."""
    if torch.is_grad_enabled():
        return 1
    wanted = torch.get_num_threads() if CHUNK_WORKERS is None else CHUNK_WORKERS
    return max(1, min(int(wanted), chunks))


def _forget_chunk_pools() -> None:
    _chunk_pools.clear()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_chunk_pools)


def _workers_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads that each run torch ops on ``threads`` intra-op threads (built
    once per such pair, then reused across batches)."""
    with _chunk_pool_lock:
        pool = _chunk_pools.get((workers, threads))
        if pool is not None:
            return pool
        while len(_chunk_pools) >= _CHUNK_POOLS_KEPT:
            # dropped, not shut down: a caller may still be mapping on it; its idle threads exit once it is freed
            _chunk_pools.pop(next(iter(_chunk_pools)))
        total = torch.get_num_threads()
        started = threading.Barrier(workers, timeout=60)  # every setup call waits for the others: one per thread

        def setup() -> None:
            torch.get_num_threads()  # ATen's one-time setup of a new thread first, so it cannot undo the next line
            torch.set_num_threads(threads)  # this thread's OpenMP team size
            started.wait()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="fz-chunks")
        try:
            for done in [pool.submit(setup) for _ in range(workers)]:
                done.result()
        except BaseException:
            pool.shutdown(wait=False)
            raise
        finally:
            # set_num_threads also stores the count that threads started later take: give the caller's back
            torch.set_num_threads(total)
        _chunk_pools[workers, threads] = pool
        return pool


def run_in_chunks(encoder: nn.Module, batch: dict[str, Tensor], device: torch.device | str) -> ModalityOutput:
    """``encoder(batch)``, on CPU image batches in chunks of ``cpu_chunk_size`` images (the same outputs up to
    float rounding, and faster for CNNs on large images); the chunks' ModalityOutputs are concatenated along the batch.

    Without grad, :func:`chunk_workers` threads run the chunks side by side, each with an equal share of torch's
    intra-op threads (one each on a 2-core CPU): a core then keeps its own chunk's activations in its caches, and
    kernels that scale badly over threads run one per core (the convolutions release the GIL). The encoder's
    forward must be safe to call from several threads at once, as an inference server would."""
    chunk = cpu_chunk_size(batch, device)
    if chunk is None:
        return encoder(batch)
    n = int(batch["pixel_values"].shape[0])
    starts = range(0, n, chunk)

    def run(i: int) -> ModalityOutput:
        return cast(ModalityOutput, encoder({k: v[i:i + chunk] if isinstance(v, Tensor) and v.dim()
                                             and v.shape[0] == n else v for k, v in batch.items()}))

    workers = chunk_workers(len(starts))
    if workers == 1:
        parts = [run(i) for i in starts]
    else:
        pool = _workers_pool(workers, max(1, torch.get_num_threads() // workers))
        inference = torch.is_inference_mode_enabled()

        def run_on_worker(i: int) -> ModalityOutput:
            with torch.inference_mode(inference), torch.no_grad():  # grad modes are per thread
                return run(i)

        parts = list(pool.map(run_on_worker, starts))
    return ModalityOutput(torch.cat([o.tokens for o in parts]), torch.cat([o.mask for o in parts]),
                          torch.cat([o.pooled for o in parts]))  # [B, T, D], [B, T], [B, D]
