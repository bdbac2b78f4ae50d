"""Tamiyo's state in Redis, so a restarted Tamiyo carries on where the last one stopped.

One hash per job, `tamiyo:job:{<job_id>}` (the braces make the job the Redis Cluster hash tag,
as for its command stream): field `state` is the controller state (JobView.to_json without
reports), fields `report:<layer_id>` the newest health report of each layer, written as it
arrives so a report is never acknowledged on the bus before it is saved. The set `tamiyo:jobs`
lists the jobs still running. Every write sets the hash to expire `retention_s` later, so the
state of a finished job, or of one nothing has been heard of for that long, goes by itself.

Loading checks what it reads as a message is checked (tamiyo.validation): an entry that fails
(a poison report saved by an older Tamiyo, a state that does not parse) is skipped with a
warning, never loaded into a crash at every restart.

Only the replica holding a job's lease writes its keys (tamiyo.lease): every write here, the
repairs on load (`repair=True`), `unlist` and `forget` included, is called by the lease holder;
the other replicas only read.
"""

from __future__ import annotations

import logging
from typing import cast

from google.protobuf.message import DecodeError
from oona.contracts import LayerHealthReport
from redis.asyncio import Redis

from tamiyo.validation import InvalidContent, JobLimits, check_id, check_report
from tamiyo.view import JobView

log = logging.getLogger(__name__)

JOBS_KEY = "tamiyo:jobs"
_STATE = b"state"
_REPORT_PREFIX = "report:"


def job_key(job_id: str) -> str:
    return f"tamiyo:job:{{{job_id}}}"


class StateStore:
    def __init__(self, redis: Redis, retention_s: float = JobLimits.retention_s) -> None:
        if retention_s <= 0:
            raise ValueError("retention_s must be > 0")
        self._redis = redis
        self._retention_ms = int(retention_s * 1000)

    async def save_state(self, view: JobView) -> None:
        key = job_key(view.job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, _STATE, view.to_json(with_reports=False))
            pipe.pexpire(key, self._retention_ms)
            if view.finished:
                pipe.srem(JOBS_KEY, view.job_id)
            else:
                pipe.sadd(JOBS_KEY, view.job_id)
            await pipe.execute()

    async def save_report(self, job_id: str, report: LayerHealthReport) -> None:
        key = job_key(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, _REPORT_PREFIX + report.layer_id, report.SerializeToString())
            pipe.pexpire(key, self._retention_ms)
            await pipe.execute()

    async def drop_reports(self, job_id: str) -> None:
        key = job_key(job_id)
        names = [name for name in cast(list[bytes], await self._redis.hkeys(key))
                 if name.startswith(_REPORT_PREFIX.encode())]
        if names:
            await self._redis.hdel(key, *names)

    async def forget(self, job_id: str) -> None:
        """Drop a job let go after the retention period: its hash has normally expired by then,
        but one saved by a Tamiyo without expiry has not."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(JOBS_KEY, job_id)
            pipe.delete(job_key(job_id))
            await pipe.execute()

    async def unlist(self, job_id: str) -> None:
        """Take a job with no readable state off the running list; what is left of its hash
        expires after the retention period (left a while, to be looked at)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(JOBS_KEY, job_id)
            pipe.pexpire(job_key(job_id), self._retention_ms)
            await pipe.execute()

    async def load(self, job_id: str, *, repair: bool = False) -> JobView | None:
        """The saved view of a job (running or recently finished); None if there is none, or if
        what is saved cannot be read (logged). With `repair` (the lease holder only), the saved
        reports that fail are deleted, so they are not warned about at every load, and a state
        that cannot be read is set to expire after the retention period; without, they are
        only skipped."""
        key = job_key(job_id)
        fields = cast(dict[bytes, bytes], await self._redis.hgetall(key))
        if _STATE not in fields:
            return None
        reports, poison = {}, []
        for name, value in fields.items():
            if not name.startswith(_REPORT_PREFIX.encode()):
                continue
            try:
                report = LayerHealthReport.FromString(value)
                check_report(report)
                if report.job_id != job_id:
                    raise InvalidContent(f"a report of job {report.job_id!r}")
            except (DecodeError, InvalidContent) as exc:
                log.warning("job %s: skipping saved %s (%s)", job_id,
                            name.decode(errors="replace")[:200], exc)
                poison.append(name)
                continue
            reports[report.layer_id] = report
        if poison and repair:
            await self._redis.hdel(key, *poison)
        try:
            view = JobView.from_json(fields[_STATE], reports)
            if view.job_id != job_id:
                raise ValueError(f"the state of job {view.job_id!r}")
        except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
            log.warning("job %s: skipping its saved state, which cannot be read (%s)", job_id,
                        str(exc)[:200])
            if repair:  # left a while, to be looked at
                await self._redis.pexpire(key, self._retention_ms)
            return None
        return view

    async def load_running(self) -> tuple[dict[str, JobView], list[str]]:
        """The views of the listed jobs, and the listed jobs with no readable state (expired,
        or unreadable), for the replica that holds their lease to `unlist`. A member that is
        not a job id is removed here: no job has it, so no replica holds its lease."""
        members = sorted(cast(set[bytes], await self._redis.smembers(JOBS_KEY)))
        views, unreadable = {}, []
        for member in members:
            job_id = member.decode(errors="replace")
            try:
                check_id("job_id", job_id)
            except InvalidContent as exc:
                log.warning("skipping a saved running job: %s", exc)
                await self._redis.srem(JOBS_KEY, member)
                continue
            view = await self.load(job_id)
            if view is None:  # expired, or unreadable
                unreadable.append(job_id)
                continue
            views[job_id] = view
        return views, unreadable
