"""Bounds on what one client connection may hold: a connection limit and idle / header / body timeouts.

uvicorn (h11) offers the keep-alive timeout (an idle connection *after* a response: ``timeout_keep_alive``), a
bound on the request head's size (``h11_max_incomplete_event_size``), the listen backlog and
``limit_concurrency`` (503, but only once a request arrives: an idle socket over it holds its descriptor until
then). It has no timeout for a connection that never sends a request, for a request head that trickles in
(slowloris) or for a body that does. ``guarded_protocol`` adds them to uvicorn's own h11 protocol, with one timer
per connection:
- **header**: the request head must be complete within ``header_s`` of the connection opening or of the first
  byte of a kept-alive connection's next request (so a fresh idle connection is closed after ``header_s`` too);
- **body**: once the head is in, the body must arrive within ``body_s`` plus one second per ``min_rate`` bytes
  received (Apache's mod_reqtimeout rule: a trickle is cut off, a big upload at any sane rate is not); time in
  which the server itself has paused reading (the app is behind) does not count;
- **connections**: a connection beyond ``max_connections`` gets a 503 at once and is closed;
- **lingering close**: a connection closed with a request body still unread (that 503, or an early 413/507/401)
  is shut for writing and drained for up to LINGER_S, so the client reads the answer instead of a reset.
A timed-out connection is closed quietly (no log line per connection)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 2.0  # a refused or early-answered connection is drained this long at most
_FD_RESERVE = 128  # descriptors kept for files, worker pipes and the event poller beyond the connections


@dataclass(frozen=True)
class ClientLimits:
    keep_alive_s: float = 5.0
    header_s: float = 10.0
    body_s: float = 20.0
    min_rate: float = 500.0     # bytes per second that buy the body one more second
    max_connections: int = 1000


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (the usual 1024 is low for a server); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int, fd_limit: int) -> int:
    """``wanted``, lowered so that the connections and the server's own files fit in ``fd_limit``."""
    return max(1, min(wanted, fd_limit - _FD_RESERVE))


def _refusal(limit: int) -> bytes:
    body = b'{"detail":"too many connections (the server takes %d at once); try again shortly"}' % limit
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


class _LingeringTransport:
    """The connection's transport as uvicorn sees it, but ``close()`` with a request body still unread (an early
    413/507/401 answer) lingers: the answer is sent, our side shut (FIN), and what the client still sends is read
    and dropped for up to LINGER_S, so its kernel does not answer the unread bytes with a reset that destroys the
    answer before the client has read it (RFC 9112 section 9.6; Apache's and nginx's lingering close)."""

    def __init__(self, transport, protocol: "GuardedH11Protocol"):
        self.raw, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def is_closing(self) -> bool:
        return self._protocol._lingering or self.raw.is_closing()

    def close(self) -> None:
        if self.raw.is_closing() or self._protocol.conn.their_state is not h11.SEND_BODY:
            self.raw.close()
        else:
            self._protocol._linger()


class GuardedH11Protocol(H11Protocol):
    limits = ClientLimits()

    def connection_made(self, transport) -> None:
        self._timer = None
        # "head" (header timer), "body" (body timer), "app" (request in: no timer), "idle" (between requests:
        # uvicorn's keep-alive timer)
        self._phase = "head"
        self._lingering = self._refused = False
        super().connection_made(_LingeringTransport(transport, self))
        if len(self.connections) > self.limits.max_connections:
            self.connections.discard(self)
            self._refused = True
            transport.write(_refusal(self.limits.max_connections))
            self._linger()
            return
        self._arm(self.limits.header_s, self._head_timeout)

    def _linger(self) -> None:
        self._disarm()
        self._lingering = True
        raw = self.transport.raw
        if raw.can_write_eof():
            raw.write_eof()  # after what is buffered
        raw.resume_reading()
        self._timer = self.loop.call_later(LINGER_S, raw.abort)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # read and dropped until the client closes or the linger ends
        if self._phase == "idle":  # the next request starts: its head gets header_s
            self._phase = "head"
            self._arm(self.limits.header_s, self._head_timeout)
        elif self._phase == "body":
            self._body_bytes += len(data)
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._disarm()
            self._phase = "idle"

    def connection_lost(self, exc) -> None:
        self._disarm()
        if not self._refused:  # a refused one never was a connection to uvicorn
            super().connection_lost(exc)

    # -- the timers ------------------------------------------------------------------------------------------

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if self._phase == "head" and state is h11.SEND_BODY:
            self._phase = "body"
            self._body_start, self._body_bytes, self._paused_s = self.loop.time(), 0, 0.0
            self._arm(self.limits.body_s, self._body_check)
        elif self._phase in ("head", "body") and state is not h11.IDLE and state is not h11.SEND_BODY:
            self._disarm()  # the request is in (or the connection is ending): the app's time is its own
            self._phase = "app"

    def _arm(self, delay: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        self.transport.raw.close()

    def _body_check(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # the app is behind, not the client: this second does not count
            self._paused_s += 1.0
            self._arm(1.0, self._body_check)
            return
        deadline = (self._body_start + self.limits.body_s + self._paused_s
                    + self._body_bytes / self.limits.min_rate)
        left = deadline - self.loop.time()
        if left > 0:
            self._arm(left, self._body_check)
            return
        self.transport.raw.close()


def guarded_protocol(limits: ClientLimits) -> type[GuardedH11Protocol]:
    """uvicorn's h11 protocol with these limits (``uvicorn.Config(http=...)`` takes a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
