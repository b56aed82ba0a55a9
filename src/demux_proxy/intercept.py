"""The TLS handshake with a client inside a CONNECT tunnel: a leaf for the name it asks.

`Interceptor.handshake` reads the client's whole first record (its ClientHello), refuses
an h2-only client (this proxy speaks HTTP/1.1), picks the leaf by SNI, else by the
CONNECT host, and runs the server side of the handshake on the `Stream` under one
`--handshake-timeout` deadline. Each failure is said in one warning line and the
tunnel ends; the caller then serves HTTP/1.1 over the TLS stream.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Final

from demux_proxy import log
from demux_proxy.ca import CertificateAuthority
from demux_proxy.stream import Stream
from demux_proxy.tls import NO_APPLICATION_PROTOCOL, first_record_size, offered_alpn

_UNFINISHED: Final = "not finished within {:g} s (--handshake-timeout)"
_HTTP1_ALPN: Final = frozenset({b"http/1.1", b"http/1.0"})


class Interceptor:
    def __init__(
        self,
        ca: CertificateAuthority,
        events: log.EventLog,
        timeout_s: float,
        shed_if_short: Callable[[OSError], int],
    ) -> None:
        self._ca = ca
        self._events = events
        self._timeout_s = timeout_s
        # Out of descriptors (a leaf's memory file needs one): idle upstreams closed.
        self._shed_if_short = shed_if_short
        self._sni: dict[int, str] = {}  # id(SSLObject) -> server name, during handshakes

    async def handshake(self, stream: Stream, host: str) -> str | None:
        """TLS towards the client of a tunnel to `host`, whose ClientHello has begun in
        `stream.buffer`: the server name it asked for (SNI), else `host`; None, said,
        when there is no TLS to speak."""
        deadline = stream.loop.time() + self._timeout_s  # for all of the handshake
        if not await self._whole_first_record(stream, host, deadline):
            return None
        offered = offered_alpn(stream.buffer)
        if offered is not None and not _HTTP1_ALPN.intersection(offered):
            # An h2-only client (gRPC, prior knowledge): OpenSSL would finish the
            # handshake with no protocol, and the client read our HTTP/1.1 as garbage.
            stream.write(NO_APPLICATION_PROTOCOL)
            stream.close()
            self._failed(
                stream,
                host,
                "the client offers "
                + ", ".join(repr(p.decode("latin-1")) for p in offered[:4])
                + " only (ALPN): this proxy speaks HTTP/1.1",
            )
            return None
        context = await self._leaf(host)
        if context is None:
            return None
        context.sni_callback = self._on_sni
        try:
            async with asyncio.timeout_at(deadline):
                await stream.start_tls_server(context)
        except ssl.SSLError as exc:
            self._failed(stream, host, exc.reason or str(exc))
            return None
        except TimeoutError:  # a ClientHello begun and never finished: said, as above
            self._failed(stream, host, _UNFINISHED.format(self._timeout_s))
            return None
        finally:
            sni = self._sni.pop(id(stream.ssl_object), None)
        return sni or host

    async def _whole_first_record(self, stream: Stream, host: str, deadline: float) -> bool:
        """Wait for the rest of the client's first TLS record (its ClientHello, which a
        post-quantum key share makes larger than one TCP segment), so that what it offers
        is judged whole. False, said, when it closes or `deadline` passes first."""
        want = first_record_size(stream.buffer)
        if len(stream.buffer) >= want:
            return True  # most handshakes: no wait, no timer
        try:
            async with asyncio.timeout_at(deadline):
                while len(stream.buffer) < want:
                    if not await stream.fill():
                        return False  # closed mid-ClientHello: nothing to answer
                    want = first_record_size(stream.buffer)
        except TimeoutError:
            self._failed(stream, host, _UNFINISHED.format(self._timeout_s))
            return False
        return True

    def _failed(self, stream: Stream, host: str, error: str) -> None:
        self._events.warning(
            "TLS handshake with client failed", client=stream.peer[0], host=host, error=error
        )

    async def _leaf(self, host: str) -> ssl.SSLContext | None:
        """The CONNECT host's leaf context; None, said, when it cannot be made (its memory
        file needs a descriptor: idle upstreams give some back, and it is tried again)."""
        for attempt in range(2):
            try:
                return self._ca.server_context(host)
            except OSError as exc:
                shed = self._shed_if_short(exc)
                if attempt or not shed:
                    self._events.error("cannot make a certificate", host=host, error=exc.strerror)
                    return None
            await asyncio.sleep(0)  # the loop closes the dropped sockets at the end of its turn
        return None  # not reached: the second attempt returns

    def _on_sni(self, sslobj: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        """Serve a leaf for the name the client asked for (SNI), else the CONNECT host's.

        The name is remembered for the upstream side too: it is what we verify there.
        """
        if not server_name:
            return
        try:
            leaf = self._ca.server_context(server_name)
        except ValueError:
            return  # not a host name we can mint for: the CONNECT host's leaf stays
        except OSError as exc:  # out of descriptors: the CONNECT host's leaf stays
            self._shed_if_short(exc)  # for the next one: no waiting in a handshake
            self._events.error("cannot make a certificate", host=server_name, error=exc.strerror)
            return
        leaf.sni_callback = self._on_sni
        sslobj.context = leaf
        self._sni[id(sslobj)] = server_name
