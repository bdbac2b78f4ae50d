"""Per-job leases in Redis: the one Tamiyo replica that holds a job's lease decides it.

`tamiyo:lease:{<job_id>}` holds the owner's replica id and expires after `ttl_ms` (the braces
make the job the Redis Cluster hash tag, as for its state and command stream). Taken with
`SET NX PX`; renewed, and released at shutdown, only by its owner (compare-and-pexpire and
compare-and-delete in Lua, so a replica whose lease expired cannot extend or drop the new
owner's). A replica also keeps each lease's expiry as it knows it (from the moment it asked,
so never later than Redis's), and stops counting on a lease it could not renew in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis

from tamiyo import metrics

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(job_id: str) -> str:
    return f"tamiyo:lease:{{{job_id}}}"


class JobLeases:
    """The leases of one replica. `clock` is monotonic seconds (injected for tests)."""

    def __init__(self, redis: Redis, replica_id: str, ttl_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be > 0")
        self._redis = redis
        self.replica_id = replica_id
        self.ttl_ms = ttl_ms
        self._clock = clock
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        # job -> when this replica's lease ends at the latest (clock seconds)
        self._expires: dict[str, float] = {}

    def held(self, job_id: str) -> bool:
        expires = self._expires.get(job_id)
        return expires is not None and self._clock() < expires

    @property
    def jobs(self) -> list[str]:
        return [job for job in self._expires if self.held(job)]

    async def acquire(self, job_id: str) -> bool:
        """Take the lease if it is free, or extend it if it is already this replica's."""
        asked = self._clock()
        taken = await self._redis.set(lease_key(job_id), self.replica_id, nx=True,
                                      px=self.ttl_ms)
        if not taken:
            return await self.renew(job_id)
        self._held_until(job_id, asked)
        return True

    async def renew(self, job_id: str) -> bool:
        asked = self._clock()
        if await self._renew(keys=[lease_key(job_id)], args=[self.replica_id, self.ttl_ms]):
            self._held_until(job_id, asked)
            return True
        self._drop(job_id)
        return False

    async def release(self, job_id: str) -> None:
        self._drop(job_id)
        await self._release(keys=[lease_key(job_id)], args=[self.replica_id])

    async def release_all(self) -> None:
        for job_id in list(self._expires):
            await self.release(job_id)

    async def owner(self, job_id: str) -> str | None:
        owner = await self._redis.get(lease_key(job_id))
        return owner.decode() if isinstance(owner, bytes) else owner

    def forget(self, job_id: str) -> None:
        """Stop counting on a lease without touching Redis (it expires by itself)."""
        self._drop(job_id)

    def _held_until(self, job_id: str, asked: float) -> None:
        self._expires[job_id] = asked + self.ttl_ms / 1000
        metrics.LEASED_JOBS.set(len(self._expires))

    def _drop(self, job_id: str) -> None:
        self._expires.pop(job_id, None)
        metrics.LEASED_JOBS.set(len(self._expires))
