"""Soak: the fleet as processes (Redis, Karn, Tamiyo, the runtime: kasmina.fleet_run's own
start-up) training digits jobs back to back for a bounded time, sampled every `--every` seconds:
RSS of each process, Redis used_memory, every stream's length and pending count, and key counts
by prefix. Writes benchmarks/results/soak_<machine>_<date>.csv (long format: one row per sample
and series) and prints each series' first and last value and its growth per minute (least
squares over the samples), so a leak shows as a slope that does not flatten.

    nice .venv/bin/python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import re
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import psutil
import redis
from kasmina.fleet_run import Fleet, start_fleet
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from oona.signing import authenticated_channel

RESULTS = Path(__file__).resolve().parent / "results"
# A job's id, a hex digest or a uuid in a key or stream name: counted under one prefix.
_VARIABLE_PART = re.compile(r"\{[^}]*\}|[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f-]{27}")


def key_prefix(key: str) -> str:
    """`tamiyo:job:{soak-3}` -> `tamiyo:job:{*}`; `oona:blob:<sha>` -> `oona:blob:*`."""
    return _VARIABLE_PART.sub(lambda m: "{*}" if m.group().startswith("{") else "*", key)


def sample(client: redis.Redis, processes: list[tuple[str, psutil.Process]],
           is_stream: dict[str, bool]) -> dict[str, float]:
    """One sample; `is_stream` caches each key prefix's type (dedupe keys run to thousands)."""
    row: dict[str, float] = {}
    for name, process in processes:
        try:  # with its children: the embedded Redis is the child of `oona serve-embedded`
            tree = [process, *process.children(recursive=True)]
            row[f"rss_mb.{name}"] = sum(p.memory_info().rss for p in tree) / 2**20
        except psutil.NoSuchProcess:
            row[f"rss_mb.{name}"] = float("nan")
    row["redis.used_memory_mb"] = client.info("memory")["used_memory"] / 2**20
    keys: Counter[str] = Counter()
    stream_len: defaultdict[str, int] = defaultdict(int)
    stream_pending: defaultdict[str, int] = defaultdict(int)
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        prefix = key_prefix(name)
        keys[prefix] += 1
        if prefix not in is_stream:
            is_stream[prefix] = client.type(key) == b"stream"
        if is_stream[prefix]:
            # per-job command streams summed into one series per prefix
            stream_len[prefix] += client.xlen(key)
            stream_pending[prefix] += sum(g["pending"] for g in client.xinfo_groups(key))
    row.update({f"keys.{p}": n for p, n in keys.items()})
    row.update({f"stream_len.{p}": n for p, n in stream_len.items()})
    row.update({f"stream_pending.{p}": n for p, n in stream_pending.items()})
    row["keys.total"] = sum(keys.values())
    return row


def run_jobs(stub: pb_grpc.KasminaRuntimeStub, stop: threading.Event, epochs: int,
             concurrent: int, done: Counter[str]) -> None:
    """Keep `concurrent` digits jobs running until `stop`; counts how each one ended."""
    def one(slot: int) -> None:
        n = 0
        while not stop.is_set():
            job_id = f"soak-{slot}-{n}"
            n += 1
            stub.SubmitJob(pb.SubmitJobRequest(job_id=job_id, recipe="digits", parameters={
                "epochs": str(epochs), "seed": str(n), "seeded": "true"}))
            state = 0
            try:
                for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
                    state = update.state
                    if stop.is_set():
                        stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="soak over"))
                        break
            except grpc.RpcError as error:
                done[f"watch_{error.code().name}"] += 1
                continue
            done[pb.JobState.Name(state)] += 1

    threads = [threading.Thread(target=one, args=(slot,), daemon=True)
               for slot in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def growth_per_minute(series: list[tuple[float, float]]) -> float:
    points = [(t, v) for t, v in series if v == v]  # NaN: process gone
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return 60.0 * cov / var if var else 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--epochs", type=int, default=20, help="epochs per digits job")
    p.add_argument("--concurrent", type=int, default=2, help="jobs running at once")
    p.add_argument("--machine", default=platform.node().split(".")[0] or "local")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or RESULTS / f"soak_{args.machine}_{datetime.date.today().isoformat()}.csv"
    run_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    fleet = Fleet(run_dir)
    # the fleet's Tamiyo settings (kasmina.fleet_run's defaults)
    fleet_args = argparse.Namespace(min_delta=0.01, plateau_epochs=2, cooldown_epochs=0,
                                    blueprints="residual_mlp")
    stop = threading.Event()
    done: Counter[str] = Counter()
    rows: list[tuple[float, str, float]] = []
    try:
        url = start_fleet(fleet, run_dir, fleet_args)
        client = redis.Redis.from_url(url)
        processes = [(name, psutil.Process(proc.pid)) for name, proc in fleet.processes]
        channel = authenticated_channel(f"127.0.0.1:{fleet.runtime_port}",
                                        fleet.env["KASMINA_API_TOKEN"])
        jobs = threading.Thread(target=run_jobs, daemon=True, args=(
            pb_grpc.KasminaRuntimeStub(channel), stop, args.epochs, args.concurrent, done))
        is_stream: dict[str, bool] = {}
        start = time.monotonic()
        jobs.start()
        while (elapsed := time.monotonic() - start) <= args.minutes * 60:
            rows += [(round(elapsed, 1), name, value)
                     for name, value in sample(client, processes, is_stream).items()]
            print(f"{elapsed:6.0f} s  jobs {dict(done)}", flush=True)
            time.sleep(max(0.0, args.every - (time.monotonic() - start - elapsed)))
        stop.set()
        jobs.join(60)
        channel.close()
    finally:
        stop.set()
        fleet.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as sink:
        writer = csv.writer(sink)
        writer.writerow(["elapsed_s", "series", "value"])
        writer.writerows(rows)
    by_series: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, name, value in rows:
        by_series[name].append((t, value))
    print(f"\n{len(rows)} samples -> {out}\njobs ended: {dict(done)}\n")
    print(f"{'series':<60} {'first':>10} {'last':>10} {'per min':>10}")
    for name in sorted(by_series):
        series = by_series[name]
        print(f"{name:<60} {series[0][1]:>10.1f} {series[-1][1]:>10.1f} "
              f"{growth_per_minute(series):>10.2f}")


if __name__ == "__main__":
    main()
