"""Hostile HTTP against every service's operator endpoints (/healthz, /readyz, /metrics; no
service serves a mutating HTTP endpoint): random methods, paths (traversal, encodings, 10 KB),
headers (huge, duplicated, control characters) and bodies (up to 1 MB), as raw bytes on a
socket so that nothing is cleaned up on the way. No answer is a 5xx (but /readyz's 503, which
means not ready), and the process keeps serving."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

_PATHS = ("/healthz", "/readyz", "/metrics", "/", "/metrics/../readyz", "/%2e%2e/%2e%2e/etc",
          "/readyz?x=" + "a" * 5000, "//metrics", "/metrics%00", "/\u00e9", "*", "/docs",
          "/openapi.json", "/" + "a" * 10_000, "http://evil/metrics")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
            "PROPFIND", "G\x00T", "get", "X" * 300)
_token = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.one_of(st.sampled_from(_METHODS), _token))
    path = draw(st.one_of(st.sampled_from(_PATHS),
                          st.text(max_size=200).map(lambda t: "/" + t.replace(" ", "%20"))))
    headers = draw(st.lists(st.tuples(
        st.one_of(st.sampled_from(["Content-Type", "Accept", "Transfer-Encoding", "Expect",
                                   "Host", "Authorization", "X-Forwarded-For", "Cookie"]),
                  _token),
        st.one_of(st.text(max_size=100), st.integers(1, 60_000).map(lambda n: "v" * n),
                  st.sampled_from(["chunked", "100-continue", "application/json", "\r\n",
                                   "gzip, chunked"]))), max_size=6))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=2048),
                          st.integers(1, 1 << 20).map(bytes)))
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    for name, value in headers:
        if name.lower() not in ("content-length", "transfer-encoding"):
            head += f"{name}: {value}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return path, head.encode("utf-8", "surrogateescape") + body


def _status(port: int, raw: bytes) -> int | None:
    """The response's status code; None when the server closed without one (a request h11
    refuses outright may get no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while we were still sending: read what it answered
        reply = b""
        try:
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
    if not reply.startswith(b"HTTP/1."):
        return None
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("name", ["karn", "tamiyo", "kasmina"])
def test_hostile_http_gets_no_5xx_and_the_service_keeps_serving(name, fault_karn, fault_tamiyo,
                                                                fault_runtime) -> None:
    service = {"karn": fault_karn, "tamiyo": fault_tamiyo, "kasmina": fault_runtime}[name]

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=requests())
    def check(request: tuple[str, bytes]) -> None:
        path, raw = request
        status = _status(service.http_port, raw)
        if status is not None and status >= 500:
            assert status == 503 and path.startswith("/readyz"), (status, raw[:300])
        service.assert_up()

    check()
    assert service.get("/readyz")[0] == 200, service.logs()[-4000:]
