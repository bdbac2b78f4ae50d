"""Oona: the Kasmina fleet's message bus on Redis Streams.

    async with oona.open_bus() as bus:                       # OONA_REDIS_URL, or embedded
        await bus.publisher("tamiyo").publish(oona.streams.commands(job), command,
                                               event_id=command.command_id)
        await bus.consumer(oona.streams.CONTROL_ACKS, "tamiyo", "tamiyo-1",
                           {CommandAck: on_ack}).run()
"""

from oona import ids as ids  # the id rule every service checks (oona.ids.check_id)
from oona import streams
from oona.bus import Bus, check_bus_persistence, open_bus
from oona.connection import Persistence, check_persistence, connect
from oona.consumer import Consumer, ConsumerConfig, Delivery, Handler
from oona.embedded import EmbeddedRedis
from oona.errors import (
                         BusUnavailable,
                         DeadLetterReason,
                         IncompatibleServer,
                         OutboxFull,
                         PayloadTooLarge,
                         Reject,
                         Retry,
)
from oona.outbox import Outbox, OutboxConfig, publishing_problems
from oona.outbox_thread import OutboxThread
from oona.publisher import Publisher
from oona.settings import BusSettings

__all__ = [
    "Bus", "BusSettings", "BusUnavailable", "Consumer", "ConsumerConfig", "DeadLetterReason",
    "Delivery", "EmbeddedRedis", "Handler", "IncompatibleServer", "Outbox", "OutboxConfig",
    "OutboxFull", "OutboxThread", "PayloadTooLarge", "Persistence", "Publisher", "Reject", "Retry",
    "check_bus_persistence", "check_persistence", "connect", "open_bus", "publishing_problems",
    "streams",
]
