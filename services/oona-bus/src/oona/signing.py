"""The fleet's authentication: HMAC-SHA256 signed envelopes (with key rotation and a freshness
window on commands), and bearer tokens on gRPC.

The MAC covers canonical bytes built field by field (length-prefixed), not the protobuf
serialization, which is not guaranteed to be identical across libraries and versions.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from oona import streams
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope

_DOMAIN = b"oona.envelope.v1"
_COMMANDS = streams.family(streams.commands("any"))


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def canonical_bytes(envelope: Envelope) -> bytes:
    """Everything a signature vouches for: fields 1-8 of the envelope."""
    parts = [
        _DOMAIN,
        envelope.event_id.encode(),
        envelope.sender_id.encode(),
        envelope.timestamp.seconds.to_bytes(8, "big", signed=True)
        + envelope.timestamp.nanos.to_bytes(4, "big", signed=True),
        envelope.trace_id.encode(),
        envelope.topic.encode(),
        envelope.schema.message_type.encode(),
        envelope.schema.version.to_bytes(4, "big"),
    ]
    body = envelope.WhichOneof("body")
    if body == "payload":
        parts += [b"payload", envelope.payload]
    elif body == "payload_ref":
        ref = envelope.payload_ref
        parts += [b"payload_ref", ref.key.encode(), ref.size.to_bytes(8, "big"), ref.sha256]
    else:
        parts.append(b"empty")
    return b"".join(_field(p) for p in parts)


def sign(envelope: Envelope, key: bytes) -> None:
    envelope.signature = hmac.digest(key, canonical_bytes(envelope), hashlib.sha256)


def verify(envelope: Envelope, key: bytes) -> bool:
    expected = hmac.digest(key, canonical_bytes(envelope), hashlib.sha256)
    return hmac.compare_digest(expected, envelope.signature)


@dataclass(frozen=True, repr=False)
class Keys:
    """How envelopes are signed and checked. `current` signs; a signature by it or by any of
    `previous` is accepted, so a rotation rolls out without a flag day: give every service the
    new key as current and the old one as previous, restart them one by one, then drop the old.

    A command envelope (topic `control.kasmina.commands.*`) must also be fresh: sent at most
    `max_command_age_s` ago (0: no limit) and at most `max_clock_skew_s` in the future, so a
    signed command recorded long ago and written again is refused even by a process that has
    forgotten its id. Other streams are not aged: a consumer catching up after an outage reads
    old reports legitimately, and their ids deduplicate replays (field reports, acks)."""

    current: bytes
    previous: tuple[bytes, ...] = ()
    # Above Tamiyo's redelivery span (ack_timeout_s 10 s x max_command_attempts 5); a runtime
    # away longer than this gets its pending commands dead-lettered stale, and Tamiyo decides
    # again from fresh reports.
    max_command_age_s: float = 300.0
    max_clock_skew_s: float = 30.0

    def __post_init__(self) -> None:
        # Not length-checked: an operator's key is their choice; docs/security.md says to use
        # 32 random bytes (python -c 'import secrets; print(secrets.token_hex(32))').
        if not all((self.current, *self.previous)):
            raise ValueError("signing keys must not be empty")
        if self.max_command_age_s < 0 or self.max_clock_skew_s < 0:
            raise ValueError("max_command_age_s and max_clock_skew_s must be >= 0")

    def verify(self, envelope: Envelope) -> bool:
        return any(verify(envelope, key) for key in (self.current, *self.previous))

    def staleness(self, envelope: Envelope, now_s: float) -> str | None:
        """Why a (verified) envelope is outside its freshness window; None when it is not."""
        if streams.family(envelope.topic) != _COMMANDS:
            return None
        sent = envelope.timestamp.seconds + envelope.timestamp.nanos / 1e9
        if sent > now_s + self.max_clock_skew_s:
            return (f"sent {sent - now_s:.0f} s in the future (more than the clock skew "
                    f"allowed, {self.max_clock_skew_s:g} s)")
        if self.max_command_age_s and now_s - sent > self.max_command_age_s:
            return (f"sent {now_s - sent:.0f} s ago (commands older than "
                    f"{self.max_command_age_s:g} s are refused: a replay, or a runtime away "
                    "that long)")
        return None


# gRPC: every call carries `authorization: Bearer <token>`; health, readiness and metrics are
# on HTTP and stay open.
TOKEN_HEADER = "authorization"


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that does not carry the service's token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty API token")
        self._expected = f"Bearer {token}".encode()

    def authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == TOKEN_HEADER:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts before reading a request."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "missing or wrong API token (metadata 'authorization: Bearer <token>')")

    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[(handler.request_streaming, handler.response_streaming)](
        deny, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def with_token(add_servicer: Callable[[Any, grpc.Server], None], token: str | None
               ) -> Callable[[Any, grpc.Server], None]:
    """`add_servicer` (a generated add_*Servicer_to_server) whose methods all go through a
    TokenInterceptor; unchanged when `token` is None (the insecure opt-out).

    oona.service.start_grpc_server builds the server without interceptors, so the servicer's
    handlers are wrapped where they are registered instead: the generated code registers each
    method twice (a generic handler and grpcio's registered-method table); only the generic one
    is kept, which grpcio falls back to, so no call can bypass the check."""
    if token is None:
        return add_servicer
    interceptor = TokenInterceptor(token)

    def add(servicer: Any, server: grpc.Server) -> None:
        add_servicer(servicer, _GuardedRegistration(server, interceptor))  # type: ignore[arg-type]

    return add


class _GuardedRegistration:
    def __init__(self, server: grpc.Server, interceptor: TokenInterceptor) -> None:
        self._server, self._interceptor = server, interceptor

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_Guarded(h, self._interceptor) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        pass  # served through the guarded generic handler (see with_token)


class _Guarded(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: TokenInterceptor) -> None:
        self._inner, self._interceptor = inner, interceptor

    def service(self, handler_call_details: Any) -> Any:
        return self._interceptor.intercept_service(self._inner.service, handler_call_details)


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor,
                              grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = (TOKEN_HEADER, f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


def authenticated_channel(address: str, token: str | None,
                          options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A channel to a fleet service whose every call sends `token` (none when None)."""
    channel = grpc.insecure_channel(address, options=options)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _TokenClientInterceptor(token))
