"""Typed settings of `python -m kasmina serve`, from `KASMINA_*` variables (the bus has its own:
`oona.BusSettings.from_env`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from oona.settings import read_secret


@dataclass(frozen=True)
class ServiceSettings:
    bind_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8081
    # Checkpoints, and the registry of unfinished jobs (jobs.json) a restart reads.
    checkpoint_dir: Path = Path("runs/checkpoints")
    # Every WatchJob stream holds a worker for the job's whole run: watchers stay below the
    # worker count so unary calls (SubmitJob, CancelJob, ...) always find a free worker.
    grpc_workers: int = 16
    max_watchers: int = 12
    max_jobs: int = 4  # jobs queued or running at once; more are RESOURCE_EXHAUSTED
    max_finished_jobs: int = 100  # finished jobs kept for WatchJob/ListSeeds and /metrics
    # Every gRPC call must carry it (`authorization: Bearer <token>`); None only with
    # OONA_INSECURE=1 (`python -m kasmina serve` refuses to start otherwise).
    api_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.max_watchers < self.grpc_workers:
            raise ValueError(f"KASMINA_MAX_WATCHERS ({self.max_watchers}) must be in "
                             f"1..KASMINA_GRPC_WORKERS-1 ({self.grpc_workers - 1})")
        if self.max_jobs < 1 or self.max_finished_jobs < 0:
            raise ValueError("KASMINA_MAX_JOBS must be >= 1 and KASMINA_MAX_FINISHED_JOBS >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """KASMINA_BIND_HOST, KASMINA_GRPC_PORT, KASMINA_HTTP_PORT, KASMINA_CHECKPOINT_DIR,
        KASMINA_GRPC_WORKERS, KASMINA_MAX_WATCHERS, KASMINA_MAX_JOBS, KASMINA_MAX_FINISHED_JOBS,
        KASMINA_API_TOKEN (or KASMINA_API_TOKEN_FILE, a file holding it).
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {"api_token": read_secret("KASMINA_API_TOKEN", env)}
        if env.get("KASMINA_BIND_HOST"):
            values["bind_host"] = env["KASMINA_BIND_HOST"]
        if env.get("KASMINA_CHECKPOINT_DIR"):
            values["checkpoint_dir"] = Path(env["KASMINA_CHECKPOINT_DIR"])
        for var, name in (("KASMINA_GRPC_PORT", "grpc_port"), ("KASMINA_HTTP_PORT", "http_port"),
                          ("KASMINA_GRPC_WORKERS", "grpc_workers"),
                          ("KASMINA_MAX_WATCHERS", "max_watchers"),
                          ("KASMINA_MAX_JOBS", "max_jobs"),
                          ("KASMINA_MAX_FINISHED_JOBS", "max_finished_jobs")):
            if env.get(var):
                try:
                    values[name] = int(env[var])
                except ValueError:
                    raise ValueError(f"{var} must be an integer, got {env[var]!r}") from None
        return cls(**values)  # type: ignore[arg-type]
