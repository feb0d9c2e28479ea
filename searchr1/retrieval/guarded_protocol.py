"""The retriever's connection limits, as a subclass of uvicorn's private ``HttpToolsProtocol``.

uvicorn (with the httptools parser) bounds neither header size nor header count, and its keep-alive timer
neither covers a silent new connection nor a request stalled in its headers. Its public API has no hooks for
these, so ``guarded_protocol`` subclasses its httptools protocol: it overrides the asyncio.Protocol methods
and the parser callbacks, and reads the private ``self.cycle``, ``self.transport`` and ``self.loop``. That is
correct for the versions it was tested with only, so it refuses to run on any other (``check_versions``):
the server then does not start, with a message naming the installed and the tested versions. pyproject.toml
pins both; to move to new versions, run tests/test_retrieval_hostile.py, tests/test_retrieval_server.py and
tests/test_retrieval_frontends.py against them and update ``TESTED_VERSIONS`` and the pins together.
"""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from searchr1.retrieval.server import ClientCounters, HttpLimits

# The versions the subclass below was written and tested against (pyproject.toml pins the same; a test checks).
TESTED_VERSIONS = {"uvicorn": "0.54.0", "httptools": "0.9.0"}


class UntestedVersionError(RuntimeError):
    """uvicorn or httptools is not the version the connection limits were tested with."""


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """Raise UntestedVersionError, naming the installed and the tested versions, unless they are equal."""
    installed = {name: _installed(name) for name in TESTED_VERSIONS}
    wrong = {name: v for name, v in installed.items() if v != TESTED_VERSIONS[name]}
    if wrong:
        have = ", ".join(f"{name} {v or 'not installed'}" for name, v in installed.items())
        tested = ", ".join(f"{name} {v}" for name, v in TESTED_VERSIONS.items())
        pins = " ".join(f"'{name}=={v}'" for name, v in TESTED_VERSIONS.items())
        raise UntestedVersionError(
            f"the retriever's HTTP connection limits subclass uvicorn's private HttpToolsProtocol and were tested "
            f"with {tested} only; installed: {have}. Install the tested versions (pip install {pins}, as "
            "pyproject.toml pins them), or re-test searchr1/retrieval/guarded_protocol.py with these and update "
            "its TESTED_VERSIONS"
        )


def guarded_protocol(limits: HttpLimits, counters: ClientCounters) -> type:
    """uvicorn's httptools protocol plus the limits it lacks.

    uvicorn bounds neither header size nor count with httptools, arms its keep-alive timer only after
    a response (and cancels it on any byte), so a silent client or one stalled in its headers would
    hold a connection forever. This subclass only observes the parser callbacks and the byte stream;
    on a violation it answers itself (431/408, ``Connection: close``) and drops the connection.

    Refuses (UntestedVersionError) on a uvicorn or httptools other than ``TESTED_VERSIONS``.
    """
    check_versions()
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    def reply(status: int, reason: str, detail: str) -> bytes:
        body = orjson.dumps({"detail": detail})
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        return head.encode("ascii") + body

    class GuardedHttpProtocol(HttpToolsProtocol):
        open_connections: set[GuardedHttpProtocol] = set()  # for the shutdown: close what is left

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timer: asyncio.TimerHandle | None = None
            self._timer_kind = ""
            self._header_raw = 0  # raw bytes of the current request's line and headers so far
            self._header_fields = 0
            self._in_body = False  # between a request's headers and the end of its body
            self._rejected = False

        # -- timers --
        def _arm(self, kind: str, delay: float, callback: Any) -> None:
            self._disarm()
            self._timer_kind = kind
            self._timer = self.loop.call_later(delay, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_kind = None, ""

        def _idle_expired(self) -> None:
            self._timer = None
            counters.idle_closed += 1
            self.transport.close()

        def _headers_expired(self) -> None:
            self._timer = None
            if self._in_body or self._header_raw == 0:  # trailing body bytes after an early answer
                self.transport.close()
                return
            counters.header_timeouts += 1
            self._reject(
                408,
                "Request Timeout",
                f"request headers not received within header_timeout_s={limits.header_timeout_s:g} "
                "(--header-timeout-s)",
            )

        def _reject(self, status: int, reason: str, detail: str) -> None:
            self._rejected = True
            self._disarm()
            if not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:  # never interleave with an answer
                    self.transport.write(reply(status, reason, detail))
                # Lingering close: stop writing, discard what the client still sends, close when it does
                # (or after a second); closing at once would reset the connection and lose the answer.
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                    self.loop.call_later(1.0, self.transport.close)
                else:
                    self.transport.close()

        # -- asyncio.Protocol --
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.open_connections.add(self)
            self._arm("idle", limits.keep_alive_timeout_s, self._idle_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self.open_connections.discard(self)
            self._disarm()
            super().connection_lost(exc)

        def eof_received(self) -> bool | None:
            if self._rejected:
                self.transport.close()
            return super().eof_received()

        def data_received(self, data: bytes) -> None:
            while data and not self._rejected and not self.transport.is_closing():
                if self._in_body:
                    if self.cycle is not None and self.cycle.response_complete and self._timer_kind != "headers":
                        # answered early (e.g. 413): what is left of the body must still arrive in time
                        self._arm("headers", limits.header_timeout_s, self._headers_expired)
                    super().data_received(data)
                    return
                if self._timer_kind != "headers":  # a request's first bytes: its headers must follow in time
                    self._arm("headers", limits.header_timeout_s, self._headers_expired)
                # Feed headers at most one byte past the limit, so the parser never buffers more.
                room = max(limits.max_header_bytes - self._header_raw, 0) + 1
                piece, data = data[:room], data[room:]
                self._header_raw += len(piece)
                super().data_received(piece)
                if not self._in_body and self._header_raw > limits.max_header_bytes and not self._rejected:
                    counters.header_too_large += 1
                    self._reject(
                        431,
                        "Request Header Fields Too Large",
                        f"request line and headers exceed max_header_bytes={limits.max_header_bytes} "
                        "(--max-header-bytes)",
                    )

        # -- httptools callbacks --
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_fields = 0

        def on_url(self, url: bytes) -> None:
            if not self._rejected:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._rejected:
                return
            self._header_fields += 1
            if self._header_fields > limits.max_headers:
                counters.header_too_large += 1
                self._reject(
                    431,
                    "Request Header Fields Too Large",
                    f"more than max_headers={limits.max_headers} header fields (--max-headers)",
                )
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._rejected:
                return
            self._in_body = True
            self._disarm()
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._rejected:
                return
            self._in_body = False
            self._header_raw = 0
            if self._timer_kind == "headers":  # the early-answer drain timer, now moot
                self._disarm()
            super().on_message_complete()

    return GuardedHttpProtocol
