"""Sweep cells in parallel: one process per core, each training cells on one thread.

A cell is a head-only model on cached features: its step is a few small matmuls that one thread runs fastest
(more threads per step lose to hand-offs), so a sweep uses a machine's cores by training several cells at once.
Workers are spawned (never forked: a forked torch with live OpenMP threads can hang) and receive the features
once, when they start; torch moves the tensors to shared memory, so N workers hold one copy. A cell's result is
the same whether it runs inline or in a worker: each cell seeds itself and runs on one thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from fusion_errors import ConfigError, FusionZooError
from recipes._quiet import is_verbose

from .features import FeatureSet
from .train import train_cell

__all__ = ["CellJob", "available_cores", "resolve_jobs", "run_cells"]


@dataclass(frozen=True)
class CellJob:
    """One cell to train: its grid position, its model config (a dict), and what ``train_cell`` needs besides."""

    head: str
    stage: str
    seed: int
    config: dict[str, Any]
    prefix: str


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_jobs(jobs: int, cells: int) -> int:
    """Worker processes for ``cells`` cells: ``jobs`` (0 = one per available core), never more than the cells."""
    if jobs < 0:
        raise ConfigError(f"--jobs {jobs} must be >= 0 (0: one process per available core).")
    return max(1, min(jobs or available_cores(), cells))


# the worker's state: set once by _init, read by every _train call in that process
_STATE: dict[str, Any] = {}


def _die_with_parent(parent: int) -> None:
    """On Linux, ask the kernel to stop this worker when the sweep process dies (a killed sweep must not leave
    workers training for minutes); elsewhere a worker ends when it next asks the dead parent for work. A parent
    that died before this ran (while the worker was still importing) means: stop now. SIGKILL, not SIGTERM:
    Lightning installs its own SIGTERM handler in a training worker, so SIGTERM only asks it to stop; a worker
    holds nothing to clean up (its results go to the parent, its features are shared memory)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _init(fs: FeatureSet, common: dict[str, Any], verbose: bool, parent: int) -> None:
    from recipes._quiet import configure_output

    _die_with_parent(parent)
    configure_output(verbose)  # as quiet (or not) as the parent
    torch.set_num_threads(1)
    _STATE.update(fs=fs, pooled=fs.pooled(), common=common)


def _cell(job: CellJob, fs: FeatureSet, pooled: FeatureSet, common: dict[str, Any],
          echo: Callable[[str], None]) -> dict[str, Any]:
    from zoo.config import FusionModelConfig

    cell_fs = pooled if job.stage == "late" else fs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small head-side models: one thread is fastest and immune to oversubscription
    try:
        return train_cell(FusionModelConfig.from_dict(job.config), cell_fs.train, cell_fs.test, job.seed,
                          common["max_epochs"], common["batch_size"], common["optim"], common["robustness"],
                          echo=echo, prefix=job.prefix, val=cell_fs.val)
    finally:
        torch.set_num_threads(threads)


def _train(job: CellJob) -> dict[str, Any]:
    return _cell(job, _STATE["fs"], _STATE["pooled"], _STATE["common"], lambda line: print(line, flush=True))


def run_cells(jobs: Sequence[CellJob], fs: FeatureSet, common: dict[str, Any], workers: int,
              echo: Callable[[str], None] = print) -> Iterator[tuple[CellJob, dict[str, Any]]]:
    """Train ``jobs`` and yield ``(job, result)`` as each finishes (in grid order with one worker).

    Args:
        jobs: the cells to train.
        fs: the features every cell reads (late cells its pooled view).
        common: ``max_epochs``, ``batch_size``, ``optim`` (OptimConfig) and ``robustness`` (train_cell's kwargs).
        workers: processes; 1 trains inline, in this process.
        echo: progress lines (workers print theirs).
    """
    if workers <= 1:
        pooled = fs.pooled()
        for job in jobs:
            echo(f"{job.prefix} ...")
            yield job, _cell(job, fs, pooled, common, echo)
        return
    echo(f"sweep: {workers} worker processes, one thread each")
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                               initargs=(fs, common, is_verbose(), os.getpid()))
    pending: dict[Future[dict[str, Any]], CellJob] = {}
    queue = list(jobs)
    try:
        while queue or pending:
            while queue and len(pending) < workers:  # submit as workers free up: an interrupt loses little
                job = queue.pop(0)
                echo(f"{job.prefix} ...")
                pending[pool.submit(_train, job)] = job
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    raise FusionZooError(f"a sweep worker died while training {job.prefix} (out of memory?); "
                                         "rerun with --jobs 1, finished cells are kept.") from e
                yield job, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
