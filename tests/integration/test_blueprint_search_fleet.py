"""Karn's blueprint search end to end, every part a real process: the embedded Redis, Karn
(`python -m karn` with its search on, one SQLite file), Tamiyo (`python -m tamiyo`, germinating
at every plateau) and digits jobs (`kasmina.attach`).

1. Karn's search room (KARN_SEARCH_MAX_HIDDEN / _RANK) is set wider than the first job's banks
   (KasminaConfig's default room: the catalog's hidden 16, rank 4). The proposals too wide for
   them are sent by Tamiyo, refused by the runtime, which publishes a field report for each
   refusal; Karn stores them and retires a proposal after two, and it is never offered again.
2. A second job whose banks have all the search's room grows a proposal: its field report is in
   Karn's database beside the proposal's provenance, and no retired proposal reaches it."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from karn.search import BlueprintSearch, SearchConfig
from karn.store import FieldReportStore
from oona import streams
from oona.contracts import Envelope, FieldReport, LayerHealthReport, SeedStage, StageVisit
from oona.embedded import free_port
from oona.envelope import ENVELOPE_FIELD
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb

pytestmark = pytest.mark.integration

# A digits job: one seed layer of 8 chunks (8 features each), banks built with the room given.
JOB = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
import kasmina
from kasmina import KasminaConfig, recipes

job_id, stop, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
p = recipes.DigitsParams(epochs=2000, seeded=False)
model = recipes.build_model(p)
kasmina.wrap(model, seeds_per_layer=8, exclude=("1", "2"),
             config=KasminaConfig(mode="min", **config))
runtime = kasmina.attach(model, job_id)
try:
    recipes.train_digits(p, model, runtime, recipes.load_digits_split(0),
                         on_epoch=lambda *_: not os.path.exists(stop))
finally:
    runtime.close()
'''
SEED = "7"  # Karn's: its first proposals are all wider than the default banks (checked below)
ROOM = {"hidden": 512, "rank": 64}
# The first job: the default banks. Its grown seeds are culled after an epoch of training and
# their chunks are free again at once, so dormant seeds are left for the refusals.
NARROW = {"reconstruction_threshold": 0.0, "max_training_epochs": 1, "embargo_epochs": 0}
ROOMY = {"bank_hidden": ROOM["hidden"], "bank_rank": ROOM["rank"]}
PROPOSED = 1_000_000
_DEADLINE_S = 60.0


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.read().decode()


class Processes:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp, self.running = env, tmp, {}

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        with (self.tmp / f"{name}.log").open("wb") as log:
            process = subprocess.Popen([sys.executable, *args], env={**self.env, **env},
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def job(self, job_id: str, config: dict) -> subprocess.Popen:
        return self.start(job_id, ["-c", JOB, job_id, str(self.tmp / f"{job_id}.stop"),
                                   json.dumps(config)])

    def stop_job(self, job_id: str) -> None:
        (self.tmp / f"{job_id}.stop").touch()
        assert self.running[job_id].wait(60) == 0, self.log(job_id)[-3000:]

    def kill_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait(condition, what: str, processes: Processes, *watched: str):
    deadline = time.monotonic() + _DEADLINE_S
    while not (found := condition()):
        for name in watched:
            assert processes.running[name].poll() is None, processes.log(name)[-3000:]
        assert time.monotonic() < deadline, f"{what}:\n" + "\n".join(
            processes.log(n)[-2000:] for n in watched)
        time.sleep(0.2)
    return found


def _rows(database: Path, query: str, *args: object) -> list[tuple]:
    with sqlite3.connect(database) as db:
        return db.execute(query, args).fetchall()


def _bad_built_ins() -> list[FieldReport]:
    """A history in which every built-in blueprint failed, so Tamiyo's germinations go to the
    proposals (a new one starts at the prior)."""
    return [FieldReport(report_id=f"earlier/{bid}/{i}", job_id="earlier", layer_id="0",
                        seed_index=0, blueprint_id=bid, final_stage=SeedStage.SEED_STAGE_CULLED,
                        chunk_size=8, contribution=-0.1, history=[StageVisit(
                            stage=SeedStage.SEED_STAGE_CULLED)])
            for bid in (1, 2, 3) for i in range(30)]


def test_refused_proposals_are_retired_and_a_proposal_grows_with_its_provenance(
        oona_restartable_broker, start_karn, karn_database: Path, publish_field_reports,
        tmp_path: Path) -> None:
    # Precondition of part 1, in-process with the same code and seed: the first round's
    # proposals are all too wide for the default banks (another Optuna: pick another seed).
    probe = FieldReportStore.open(f"sqlite:///{tmp_path / 'probe.db'}")
    first = BlueprintSearch(probe, SearchConfig(seed=int(SEED), max_hidden=ROOM["hidden"],
                                                max_rank=ROOM["rank"])).step()
    probe.close()
    assert all(p.spec.hidden > 16 or p.spec.rank > 4 for p in first), first

    karn = start_karn(KARN_RANDOM_SEED=SEED, KARN_SEARCH_INTERVAL_S="0.3",
                      KARN_SEARCH_MAX_HIDDEN=str(ROOM["hidden"]),
                      KARN_SEARCH_MAX_RANK=str(ROOM["rank"]))
    publish_field_reports(_bad_built_ins())
    karn_grpc = int(re.search(r"serving: gRPC [^ ]+:(\d+)", karn.logs()).group(1))
    env = {**os.environ, "OONA_REDIS_URL": oona_restartable_broker.url}
    processes = Processes(env, tmp_path)
    try:
        tamiyo_http = free_port()
        processes.start(
            "tamiyo", ["-m", "tamiyo"], TAMIYO_GRPC_PORT=str(free_port()),
            TAMIYO_HTTP_PORT=str(tamiyo_http), TAMIYO_KARN_ADDRESS=f"127.0.0.1:{karn_grpc}",
            # every epoch a plateau and no cooldown: a germination at every boundary
            TAMIYO_PLATEAU_EPOCHS="1", TAMIYO_MIN_DELTA="100", TAMIYO_COOLDOWN_EPOCHS="0",
            TAMIYO_TICK_S="0.1", TAMIYO_REPORT_GRACE_S="0.2", TAMIYO_SHUTDOWN_GRACE_S="5",
            # generous: a loaded 2-core CI machine must not turn this into the fallback
            TAMIYO_KARN_TIMEOUT_S="10")
        _wait(lambda: _ready(tamiyo_http), "tamiyo not ready", processes, "tamiyo")

        # 1. the default banks refuse what is too wide; Karn retires it
        processes.job("narrow", NARROW)
        retired = _wait(lambda: _rows(
            karn_database, "SELECT blueprint_id, status_reason FROM karn_blueprint_proposals "
            "WHERE status = 'retired'"), "no proposal retired", processes, "narrow", "tamiyo")
        processes.stop_job("narrow")
        retired_ids = {bid for bid, _ in retired}
        # Retired at the search round after its second refusal (a third may be in by then).
        assert all(int(re.match(r"refused (\d+) times", reason).group(1)) >= 2
                   for _, reason in retired), retired
        refusals = _rows(karn_database, "SELECT blueprint_id, job_id, end_reason, history FROM "
                         "karn_field_reports WHERE final_stage = 'DORMANT'")
        for bid in retired_ids:
            mine = [r for r in refusals if r[0] == bid]
            assert len(mine) >= 2 and all(r[1] == "narrow" and r[3] == "[]" for r in mine)
            assert all(r[2].startswith("refused: ACK_REASON_UNKNOWN_BLUEPRINT")
                       and "bank_hidden" in r[2] for r in mine), mine
        # never offered again, though it fits the chunk
        offered = karn.karn.Recommend(karn_pb.RecommendRequest(chunk_size=8, limit=1024),
                                      timeout=10).recommendations
        assert offered and not retired_ids & {r.blueprint.blueprint_id for r in offered}

        # 2. a job with all the room grows a proposal; no retired one is sent to it
        processes.job("roomy", ROOMY)
        grown = _wait(lambda: _rows(
            karn_database, "SELECT r.blueprint_id, r.blueprint_name, r.final_stage, r.history, "
            "b.name, b.hidden, b.rank, p.proposer, p.parent_blueprint_id, p.params "
            "FROM karn_field_reports r JOIN karn_blueprints b USING (blueprint_id) "
            "JOIN karn_blueprint_proposals p USING (blueprint_id) WHERE r.job_id = 'roomy'"),
            "no field report of a proposal grown in the roomy job", processes, "roomy",
            "tamiyo")
        processes.stop_job("roomy")
        bid, name, stage, history, spec_name, hidden, rank, proposer, parent, params = grown[0]
        assert bid >= PROPOSED and bid not in retired_ids
        assert stage in ("FOSSILIZED", "CULLED", "ROLLED_BACK", "CANCELLED"), grown[0]
        assert name == spec_name and proposer == "optuna-tpe" and parent in (1, 2)
        asked = json.loads(params)
        assert asked.get("hidden", 0) == hidden and asked.get("rank", 0) == rank
        # it trained in its bank (parameters_added counts only seeds blended in, past TRAINING)
        assert "SEED_STAGE_TRAINING" in history, grown[0]
        roomy = _rows(karn_database, "SELECT blueprint_id, final_stage FROM karn_field_reports "
                      "WHERE job_id = 'roomy'")
        assert not retired_ids & {b for b, _ in roomy}, roomy
        grew = _blueprints_grown(oona_restartable_broker.url, "roomy")
        assert bid in grew and not retired_ids & grew, (grew, retired_ids)
        assert "DORMANT" not in {s for _, s in roomy}, roomy  # it had room for everything
        # the search never asks for a retired proposal's sizes again
        asks = [json.loads(p) for (p,) in _rows(
            karn_database, "SELECT params FROM karn_blueprint_proposals")]
        assert len(asks) == len({json.dumps(a, sort_keys=True) for a in asks})
        tamiyo = processes.running["tamiyo"]
        tamiyo.terminate()
        assert tamiyo.wait(30) == 0, processes.log("tamiyo")[-3000:]
    finally:
        processes.kill_all()
    assert karn.terminate() == 0, karn.logs()[-3000:]
    for name in ("narrow", "roomy", "tamiyo"):
        assert "Traceback" not in processes.log(name), processes.log(name)[-3000:]


def _blueprints_grown(url: str, job_id: str) -> set[int]:
    """Every blueprint id a seed of the job held in its health reports."""
    grown = set()
    with redis.Redis.from_url(url) as client:
        for _id, fields in client.xrange(streams.TELEMETRY_SEED_HEALTH):
            report = LayerHealthReport.FromString(Envelope.FromString(
                fields[ENVELOPE_FIELD]).payload)
            if report.job_id == job_id:
                grown.update(b for b in report.blueprint_id if b >= 0)
    return grown


def _ready(port: int) -> bool:
    try:
        _get(port, "/readyz")
        return True
    except OSError:
        return False
