"""Job leases against a real Redis (a private embedded server per test): one owner at a time,
renewal and release only by the owner, takeover after expiry, and the owner's own view of its
lease ending no later than Redis's."""

from __future__ import annotations

import asyncio

from oona import BusSettings, open_bus
from tamiyo import metrics
from tamiyo.lease import JobLeases, lease_key


def _run(url: str, body) -> None:
    async def main() -> None:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            await body(bus.redis)

    asyncio.run(main())


def test_one_owner_at_a_time_until_it_expires(private_redis_url):
    async def body(redis) -> None:
        a, b = JobLeases(redis, "a", 300), JobLeases(redis, "b", 300)
        assert await a.acquire("job-1") and a.held("job-1")
        assert not await b.acquire("job-1") and not b.held("job-1")
        assert await a.owner("job-1") == "a" and await redis.get(lease_key("job-1")) == b"a"
        assert 0 < await redis.pttl(lease_key("job-1")) <= 300
        assert await b.acquire("job-2"), "leases are per job"
        assert a.jobs == ["job-1"] and b.jobs == ["job-2"]
        await asyncio.sleep(0.4)  # a stops renewing: the lease expires
        assert not a.held("job-1")
        assert await b.acquire("job-1") and await b.owner("job-1") == "b"
        assert not await a.renew("job-1"), "a cannot extend b's lease"
        assert not await a.acquire("job-1") and await b.owner("job-1") == "b"

    _run(private_redis_url, body)


def test_only_the_owner_renews_and_releases(private_redis_url):
    async def body(redis) -> None:
        a, b = JobLeases(redis, "a", 1000), JobLeases(redis, "b", 1000)
        assert await a.acquire("job-1")
        await redis.pexpire(lease_key("job-1"), 100)
        assert not await b.renew("job-1")
        assert await redis.pttl(lease_key("job-1")) <= 100, "b's renew left the ttl alone"
        assert await a.renew("job-1")
        assert await redis.pttl(lease_key("job-1")) > 900
        assert await a.acquire("job-1"), "acquiring one's own lease renews it"
        await b.release("job-1")
        assert await a.owner("job-1") == "a", "b's release left a's lease alone"
        await a.release("job-1")
        assert await redis.exists(lease_key("job-1")) == 0 and not a.held("job-1")
        assert await b.acquire("job-1"), "released: free at once, not after the ttl"

    _run(private_redis_url, body)


def test_the_owner_stops_counting_on_a_lease_when_its_ttl_has_passed(private_redis_url):
    async def body(redis) -> None:
        now = [100.0]
        a = JobLeases(redis, "a", 5000, clock=lambda: now[0])
        assert await a.acquire("job-1")
        now[0] += 4.999
        assert a.held("job-1")
        now[0] += 0.002  # a renewal stalled past the ttl: Redis may have handed it on
        assert not a.held("job-1") and a.jobs == []
        assert await a.renew("job-1") and a.held("job-1"), "still a's in Redis: renewed"

    _run(private_redis_url, body)


def test_the_leased_jobs_gauge_follows_the_leases(private_redis_url):
    async def body(redis) -> None:
        a = JobLeases(redis, "a", 5000)
        for job in ("job-1", "job-2"):
            assert await a.acquire(job)
        assert metrics.LEASED_JOBS._value.get() == 2
        await a.release("job-1")
        assert metrics.LEASED_JOBS._value.get() == 1
        await redis.set(lease_key("job-2"), "b")  # taken over behind a's back
        assert not await a.renew("job-2")
        assert metrics.LEASED_JOBS._value.get() == 0
        await a.release_all()

    _run(private_redis_url, body)
