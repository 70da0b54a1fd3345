"""Load benchmark of ``fusion-zoo serve``: ``python benchmarks/serve_load.py [--seconds 30] [--clients 64]``.

Starts ``fusion-zoo serve --model tridigits-late-gating`` in a subprocess on 127.0.0.1, twice: with dynamic
batching (the defaults) and with ``--max-batch-size 1``. Each time, ``clients`` concurrent asyncio + httpx
clients send multipart requests (a tridigits test sample's PNG, WAV and text, cycling over ``samples`` of them)
back to back for ``seconds``. Reported: throughput, p50/p99 latency, answers by status, the server's peak RSS
(VmHWM from /proc/<pid>/status, read before it is stopped), and the batching speedup (throughput ratio).

503s are deliberate load shedding (bounded queue) and are counted apart from errors; everything else that is
not a 200 (other statuses, client timeouts, dropped connections) is an error. ``measure()`` returns the keys;
``merge_results()`` writes them into benchmarks/results.json without touching the other keys.

The overload run (``--phases overload``) starts the server with every default and sends from ``--overload-clients``
(200) clients for ``seconds``; each honours Retry-After. Reported: the 503 share, p99 of the accepted requests and
the recovery time: from the end of the load (no new requests) until ``/health`` shows nothing open or queued and
a prediction is answered.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion_common.atomic import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tridigits-late-gating"
# p99 of closed-loop clients is mostly queueing (64 clients / throughput, Little's law): its bound is the request
# timeout, i.e. no request came near a 504. The error rate and p99 are of the batched (default) server.
TARGETS: dict[str, tuple[str, float]] = {
    "serve_batching_speedup": (">=", 2.0),
    "serve_p99_ms": ("<=", 30000.0),
    "serve_error_rate": ("<=", 0.0),
    "serve_peak_mb": ("<", 2048.0),
    # overload (200 clients, default settings): accepted requests answer well under the 30-s request timeout, and
    # the server is back to normal answers within the time a queue may hold (a quarter of the timeout) plus slack
    "serve_overload_p99_ms": ("<=", 15000.0),
    "serve_overload_recovery_s": ("<=", 10.0),
}
REPORTED = ("serve_overload_503_share", "serve_overload")  # merged without a target

__all__ = ["measure", "merge_results", "TARGETS"]


def _bodies(n: int) -> list[tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]]:
    """``n`` tridigits test samples as (form fields, files) of a multipart request."""
    import soundfile as sf

    sys.path.insert(0, str(ROOT))
    from recipes.build_pretrained import raw_split

    raw, _ = raw_split("test", limit=n)
    out = []
    for text, image, (wav, rate) in zip(raw["text"], raw["image"], raw["audio"], strict=True):
        png, clip = io.BytesIO(), io.BytesIO()
        image.save(png, "PNG")
        sf.write(clip, wav, rate, format="WAV")
        out.append(({"text": text}, {"image": ("digit.png", png.getvalue(), "image/png"),
                                     "audio": ("digit.wav", clip.getvalue(), "audio/wav")}))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _start(port: int, max_batch_size: int | None, threads: int | None, max_queue: int | None,
           log: Any) -> subprocess.Popen[bytes]:
    """The server; a None size is left at the command's default."""
    cmd = [sys.executable, "-m", "zoo.cli", "serve", "--model", MODEL, "--port", str(port), "--log-level", "warning"]
    if max_batch_size is not None:
        cmd += ["--max-batch-size", str(max_batch_size)]
    if max_queue is not None:
        cmd += ["--max-queue", str(max_queue)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)  # the server as users start it: torch picks the thread count
    if threads:
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


async def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            try:
                if (await c.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)


async def _recovery(c: Any, stop: float, body: Any) -> float:
    """Seconds from ``stop`` (the load's end) until /health shows nothing open or queued and a prediction answers."""
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    data, files = body
    while True:
        h = await c.get("/health")
        idle = h.status_code == 200 and h.json().get("in_flight", 0) == 0 and h.json().get("queue_depth") == 0
        if idle and (await c.post("/predict", data=data, files=files)).status_code == 200:
            return time.perf_counter() - stop
        await asyncio.sleep(0.05)


async def _load(url: str, bodies: list[Any], clients: int, seconds: float, recovery: bool = False) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as c:
        for data, files in bodies[:4]:  # warm-up: first forward passes, connection set-up
            (await c.post("/predict", data=data, files=files)).raise_for_status()
        start = time.perf_counter()
        stop = start + seconds

        async def client(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                data, files = bodies[k % len(bodies)]
                k += clients
                t = time.perf_counter()
                try:
                    r = await c.post("/predict", data=data, files=files)
                    key = str(r.status_code)
                    if r.status_code == 503:
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key == "200":
                    latencies.append(time.perf_counter() - t)
                statuses[key] = statuses.get(key, 0) + 1

        probe = asyncio.ensure_future(_recovery(c, stop, bodies[0])) if recovery else None
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
        recovery_s = await probe if probe is not None else None
        health = (await c.get("/health")).json()
    latencies.sort()
    total = sum(statuses.values())
    errors = sum(n for k, n in statuses.items() if k not in ("200", "503"))

    def pct(q: float) -> float | None:
        return 1000.0 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"seconds": elapsed, "requests": total, "ok": statuses.get("200", 0),
            "throughput_rps": statuses.get("200", 0) / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "statuses": statuses, "error_rate": errors / total if total else None,
            "shed_503": statuses.get("503", 0), "share_503": statuses.get("503", 0) / total if total else None,
            "recovery_s": recovery_s, "busy_rejections": health.get("busy_rejections"),
            "mean_batch": health.get("mean_batch"),
            "max_batch": health.get("max_batch"), "mean_batch_ms": health.get("mean_batch_ms")}


def _phase(bodies: list[Any], max_batch_size: int | None, clients: int, seconds: float, threads: int | None,
           max_queue: int | None, recovery: bool = False) -> dict[str, Any]:
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = _start(port, max_batch_size, threads, max_queue, log)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(_wait_up(url, proc, 300))
            out = asyncio.run(_load(url, bodies, clients, seconds, recovery))
            out["peak_mb"] = _peak_mb(proc.pid)
        except Exception:
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    out.update(max_batch_size=max_batch_size, clients=clients, threads=threads, max_queue=max_queue)
    return out


def _load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _host() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average": _load_average()}


def measure(seconds: float = 30.0, clients: int = 64, samples: int = 32, threads: int | None = None,
            max_queue: int = 256, phases: tuple[str, ...] = ("batching", "overload"),
            overload_clients: int = 200) -> dict[str, Any]:
    """The chosen phases: ``batching`` (batched vs batch size 1, same load) gives the ``serve_*`` keys plus
    ``serve_details``; ``overload`` (``overload_clients`` against the defaults) the ``serve_overload*`` keys."""
    bodies = _bodies(samples)
    out: dict[str, Any] = {}
    if "batching" in phases:
        load_before = _load_average()
        batched = _phase(bodies, 32, clients, seconds, threads, max_queue)
        single = _phase(bodies, 1, clients, seconds, threads, max_queue)
        out.update({
            "serve_batching_speedup": batched["throughput_rps"] / single["throughput_rps"]
            if single["throughput_rps"] else None,
            "serve_p99_ms": batched["p99_ms"],
            "serve_error_rate": batched["error_rate"],
            "serve_peak_mb": batched["peak_mb"],
            "serve_details": {"model": MODEL, "batched": batched, "batch_size_1": single, "cpu_count": os.cpu_count(),
                              "load_average_before": load_before, "load_average_after": _load_average(),
                              "client": "asyncio + httpx, multipart PNG + WAV + text per request, 127.0.0.1"},
        })
    if "overload" in phases:
        host_before = _host()
        run = _phase(bodies, None, overload_clients, seconds, threads, None, recovery=True)
        out.update({
            "serve_overload_503_share": run["share_503"],
            "serve_overload_p99_ms": run["p99_ms"],
            "serve_overload_recovery_s": run["recovery_s"],
            "serve_overload": {**run, "model": MODEL, "settings": "fusion-zoo serve defaults", "host": host_before,
                               "load_average_after": _load_average(),
                               "client": "asyncio + httpx, honours Retry-After, multipart PNG + WAV + text"},
        })
    return out


def merge_results(out: dict[str, Any], path: Path = ROOT / "benchmarks" / "results.json") -> Path:
    """Write the measured ``serve_*`` keys (values, targets, met) into ``results.json``, keeping every other key
    (a phase that did not run leaves its keys as they were)."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    doc.setdefault("targets", {})
    doc.setdefault("met", {})
    for key, (op, target) in TARGETS.items():
        if key not in out:
            continue
        value = out[key]
        doc[key] = value
        doc["targets"][key] = {"op": op, "value": target}
        doc["met"][key] = None if value is None else {">=": value >= target, "<=": value <= target,
                                                      "<": value < target}[op]
    doc.update({key: out[key] for key in REPORTED if key in out})
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="load duration of each phase")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--samples", type=int, default=32, help="distinct tridigits samples the clients cycle over")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server's forward pass (default: the server's default, one per core)")
    p.add_argument("--phases", default="batching,overload",
                   help="comma-separated: batching (batched vs batch size 1), overload (200 clients, defaults)")
    p.add_argument("--overload-clients", type=int, default=200, help="clients of the overload run")
    p.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results.json alone")
    args = p.parse_args(argv)
    phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    unknown = sorted(set(phases) - {"batching", "overload"})
    if unknown or not phases:
        p.error(f"--phases {args.phases!r}: choose from batching, overload (comma-separated)")
    out = measure(args.seconds, args.clients, args.samples, args.threads, phases=phases,
                  overload_clients=args.overload_clients)
    print(json.dumps(out, indent=2, default=str))
    if not args.no_write:
        print(f"merged into {merge_results(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
