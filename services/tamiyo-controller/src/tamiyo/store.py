"""Tamiyo's state in Redis, so a restarted Tamiyo carries on where the last one stopped.

One hash per job, `tamiyo:job:{<job_id>}` (the braces make the job the Redis Cluster hash tag,
as for its command stream): field `state` is the controller state (JobView.to_json without
reports), fields `report:<layer_id>` the newest health report of each layer, written as it
arrives so a report is never acknowledged on the bus before it is saved. The set `tamiyo:jobs`
lists the jobs still running; a finished job's hash expires after `finished_ttl_s`.
"""

from __future__ import annotations

from typing import cast

from oona.contracts import LayerHealthReport
from redis.asyncio import Redis

from tamiyo.view import JobView

JOBS_KEY = "tamiyo:jobs"
_STATE = b"state"
_REPORT_PREFIX = "report:"


def job_key(job_id: str) -> str:
    return f"tamiyo:job:{{{job_id}}}"


class StateStore:
    def __init__(self, redis: Redis, finished_ttl_s: int = 7 * 24 * 3600) -> None:
        self._redis = redis
        self._finished_ttl_s = finished_ttl_s

    async def save_state(self, view: JobView) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(view.job_id), _STATE, view.to_json(with_reports=False))
            if view.finished:
                pipe.srem(JOBS_KEY, view.job_id)
                pipe.expire(job_key(view.job_id), self._finished_ttl_s)
            else:
                pipe.sadd(JOBS_KEY, view.job_id)
            await pipe.execute()

    async def save_report(self, job_id: str, report: LayerHealthReport) -> None:
        await self._redis.hset(job_key(job_id), _REPORT_PREFIX + report.layer_id,
                               report.SerializeToString())

    async def drop_reports(self, job_id: str) -> None:
        key = job_key(job_id)
        names = [name for name in cast(list[bytes], await self._redis.hkeys(key))
                 if name.startswith(_REPORT_PREFIX.encode())]
        if names:
            await self._redis.hdel(key, *names)

    async def load(self, job_id: str) -> JobView | None:
        """The saved view of a job (running or recently finished); None if there is none."""
        fields = cast(dict[bytes, bytes], await self._redis.hgetall(job_key(job_id)))
        if _STATE not in fields:
            return None
        reports = {}
        for name, value in fields.items():
            if name.startswith(_REPORT_PREFIX.encode()):
                report = LayerHealthReport.FromString(value)
                reports[report.layer_id] = report
        return JobView.from_json(fields[_STATE], reports)

    async def load_running(self) -> dict[str, JobView]:
        job_ids = sorted(m.decode() for m in cast(set[bytes], await self._redis.smembers(JOBS_KEY)))
        views = {}
        for job_id in job_ids:
            view = await self.load(job_id)
            if view is not None:
                views[job_id] = view
        return views
