"""The registry of a runtime's unfinished jobs: `jobs.json` in its checkpoint directory, so the
next runtime started on that directory knows what a killed one left running (and reports those
jobs failed, or resumes them from their last checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class JobRegistry:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "jobs.json"
        self._lock = threading.Lock()

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
            tmp.write_text(json.dumps(jobs, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # a kill mid-write leaves the old registry whole
