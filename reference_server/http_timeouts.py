"""A header-read timeout for uvicorn's h11 protocol, which has none of its own (issue 20, a low item).

uvicorn closes a connection idle between requests after ``timeout_keep_alive``,
but once a client sent a first byte it waits for the rest of the headers for
ever: 3000 connections sending one header byte a minute were all held. nginx
drops such a client after ``client_header_timeout`` (60 s). This protocol
closes a connection whose request headers are not complete within
``header_timeout_s`` of its opening or of its previous response. Body reads are
bounded by ``guards.BodySizeLimit`` (408).
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


class H11WithHeaderTimeout(H11Protocol):
    header_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._check_headers)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._waiting_since = self.loop.time()  # the next request's headers have their own time

    def _check_headers(self) -> None:
        if self.transport.is_closing():
            return
        waiting = self.cycle is None or self.cycle.response_complete  # no request whose headers are in
        waited = self.loop.time() - self._waiting_since
        if waiting and waited >= self.header_timeout_s:
            self.logger.info("closing a connection whose request headers took over %.0f s (--header-timeout-s)",
                             self.header_timeout_s)
            self.transport.close()
            return
        delay = self.header_timeout_s - waited if waiting else self.header_timeout_s
        self._header_timer = self.loop.call_later(max(delay, 0.05), self._check_headers)

    def connection_lost(self, exc) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


def with_header_timeout(seconds: float) -> type[H11WithHeaderTimeout]:
    """The protocol class for uvicorn's ``http=`` with this timeout."""
    return type("H11WithHeaderTimeout", (H11WithHeaderTimeout,), {"header_timeout_s": float(seconds)})
