"""The registry of a runtime's unfinished jobs: `jobs.json` in its checkpoint directory, so the
next runtime started on that directory knows what a killed one left running (and reports those
jobs failed, or resumes them from their last checkpoint).

One runtime owns a directory: it holds an exclusive lock on `jobs.lock` for its life, and a
second runtime started on the same directory refuses to start (it would report the first one's
live jobs failed, or train them twice). Writes are fsynced, so a power loss leaves the old
registry or the new one, never an empty file."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class DirectoryInUse(RuntimeError):
    """Another runtime holds this checkpoint directory."""


class JobRegistry:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "jobs.json"
        self._lock = threading.Lock()
        # A descriptor held for the registry's life (released by close() or the process's end).
        self._owner: int | None = os.open(directory / "jobs.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._owner)
            raise DirectoryInUse(f"another runtime holds {directory} (jobs.lock): give each "
                                 f"runtime its own KASMINA_CHECKPOINT_DIR") from None

    def close(self) -> None:
        if self._owner is not None:
            os.close(self._owner)  # releases the lock
            self._owner = None

    def unfinished(self) -> dict[str, dict]:
        """job id -> {"recipe", "parameters", "checkpoint"} of the jobs left running."""
        try:
            jobs = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # a damaged registry must not stop the service starting
            aside = self.path.with_name(self.path.name + ".damaged")
            os.replace(self.path, aside)
            log.error("job registry %s unreadable (%s): moved to %s", self.path, exc, aside)
            return {}
        if not isinstance(jobs, dict):
            return {}
        return {k: v for k, v in jobs.items() if isinstance(k, str) and isinstance(v, dict)}

    def started(self, job_id: str, recipe: str, parameters: dict[str, str],
                checkpoint: str = "") -> None:
        self._update(job_id, {"recipe": recipe, "parameters": parameters,
                              "checkpoint": checkpoint})

    def checkpointed(self, job_id: str, path: Path) -> None:
        self._update(job_id, {"checkpoint": str(path)})

    def finished(self, job_id: str) -> None:
        self._update(job_id, None)

    def _update(self, job_id: str, fields: dict | None) -> None:
        with self._lock:
            jobs = self.unfinished()
            if fields is None:
                jobs.pop(job_id, None)
            elif job_id in jobs or "recipe" in fields:
                jobs[job_id] = {**jobs.get(job_id, {}), **fields}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w") as out:
                out.write(json.dumps(jobs, indent=1, sort_keys=True))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)  # a kill mid-write leaves the old registry whole
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power loss
            finally:
                os.close(directory)
