"""The floor: the least an intercepting proxy on our stack can cost (a benchmark baseline).

Not a proxy anyone should run. It has none of what demux-proxy is: no parser (it looks for
CRLFCRLF and Content-Length, nothing else), no validation, no logs, no metrics, no limits,
no destination policy, no pool, no retries, no rotation per request (each client
connection gets one upstream connection, from the next --egress address). What it keeps
is the stack: Python, uvloop, the ssl module over OpenSSL, CONNECT with interception
(uvloop's start_tls, one leaf certificate per host from the bench CA), upstream TLS
verified against --upstream-ca, keep-alive both ways, bodies streamed with flow control.

Run beside demux-proxy by the harness (`BENCH_FLOOR=1 make bench`), it shows how much of
demux-proxy's cost per request is the stack and how much is its own work
(docs/performance.md, "The floor").

`--our-heads-and-logs` adds three parts of demux-proxy's own work, called from its
installed (compiled) modules: both heads parsed (`http1.parser`) and rebuilt without
their hop-by-hop fields (`http1.headers`, `http1.writer`), and the two log lines per
request (`log.EventLog`). Still callback-driven, with no task wake-up per response, it
estimates what a request path of that shape would cost with the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import itertools
import os
import socket
import ssl
import tempfile

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HIGH = 512 * 1024
WORK = None  # the demux_proxy modules, with --our-heads-and-logs


class Leaves:
    """One server context per CONNECT host, signed by the bench CA."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        with open(cert_path, "rb") as f:
            self.ca = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            self.ca_key = serialization.load_pem_private_key(f.read(), None)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.contexts: dict[str, ssl.SSLContext] = {}

    def context(self, host: str) -> ssl.SSLContext:
        ctx = self.contexts.get(host)
        if ctx is None:
            ctx = self.contexts[host] = self._mint(host)
        return ctx

    def _mint(self, host: str) -> ssl.SSLContext:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.ca.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(self.ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as d:
            cert_file, key_file = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            with open(cert_file, "wb") as f:
                f.write(cert.public_bytes(serialization.Encoding.PEM))
            with open(key_file, "wb") as f:
                f.write(
                    self.key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
            ctx.load_cert_chain(cert_file, key_file)
        return ctx


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.buf = bytearray()
        self.left = -1  # body bytes still to relay; -1 while reading a head
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.left > 0:
            n = min(self.left, len(data))
            client.send(data[:n])
            self.left -= n
            if self.left == 0:
                client.done()
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head_end = end + 4
        if WORK is not None:
            parser, headers, writer, _ = WORK
            resp = parser.parse_response_head(bytes(self.buf[:head_end]))
            length = resp.content_length or 0
            kept = headers.end_to_end(resp.headers, resp.connection, drop_length=False)
            out = writer.response_head(resp.status, resp.reason, kept)
            body = bytes(self.buf[head_end : head_end + length])
            client.send(out + body)
            client.our_response_line(resp.status, length)
        else:
            head = bytes(self.buf[:head_end]).lower()
            i = head.find(b"\r\ncontent-length:")
            length = int(head[i + 17 : head.find(b"\r\n", i + 2)]) if i >= 0 else 0
            body = self.buf[head_end : head_end + length]
            client.send(bytes(self.buf[: head_end + len(body)]))
        rest = length - len(body)
        self.buf.clear()
        if rest > 0:
            self.left = rest
        else:
            self.left = -1
            client.done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, proxy: Floor) -> None:
        self.proxy = proxy
        self.buf = bytearray()
        self.t: asyncio.Transport | None = None
        self.up: Upstream | None = None
        self.busy = False
        self.tunnel: tuple[str, int] | None = None
        self.tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next()

    def next(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        line_end = head.find(b"\r\n")
        method, target, version = head[:line_end].split(b" ")
        if WORK is not None and method != b"CONNECT":
            head = self.our_request_head(head)
            line_end = head.find(b"\r\n")
        if method == b"CONNECT":
            host, _, port = target.decode().rpartition(":")
            self.tunnel = (host, int(port))
            assert self.t is not None
            self.t.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            asyncio.get_running_loop().create_task(self.intercept(host))
            return
        if self.tunnel is None:  # absolute-form: http://host[:port]/path
            authority, _, path = target[7:].partition(b"/")
            host, _, port = authority.decode().partition(":")
            dest = (host, int(port or 80))
            head = method + b" /" + path + b" " + version + head[line_end:]
        else:
            dest = self.tunnel
        self.busy = True
        if self.up is None:
            asyncio.get_running_loop().create_task(self.dial(dest, head))
        else:
            assert self.up.t is not None
            self.up.t.write(head)

    def our_request_head(self, head: bytes) -> bytes:
        parser, headers, writer, log = WORK  # type: ignore[misc]
        req = parser.parse_request_head(head)
        self.sid = sid = next(self.proxy.sessions)
        self.method = method = req.method.decode("latin-1")
        target = req.target.decode("latin-1")
        if self.tunnel is not None:
            target = f"https://{self.tunnel[0]}:{self.tunnel[1]}{target}"
        self.url = url = target
        fields = {"client": "127.0.0.1", "device": "lo", "interface": "127.0.0.2", "method": method,
                  "session_id": sid, "type": "request", "url": url}
        self.proxy.events.emit(log.INFO, "outbound request", fields, in_order=True)
        kept = headers.end_to_end(req.headers, req.connection, drop_length=False)
        return writer.request_head(req.method, req.target, kept)

    def our_response_line(self, status: int, size: int) -> None:
        _, _, _, log = WORK  # type: ignore[misc]
        fields = {"bytes": size, "bytes_sent": 0, "client": "127.0.0.1", "duration_ms": 0.1,
                  "interface": "127.0.0.2", "method": self.method, "session_id": self.sid,
                  "status_code": status, "type": "response", "url": self.url}
        self.proxy.events.emit(log.INFO, "inbound response", fields, in_order=True)

    async def intercept(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        assert self.t is not None
        self.t = await loop.start_tls(self.t, self, self.proxy.leaves.context(host), server_side=True)  # type: ignore[assignment]
        self.tls = True

    async def dial(self, dest: tuple[str, int], head: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((next(self.proxy.egress), 0))
        try:
            await loop.sock_connect(sock, dest)
            tls = self.proxy.upstream_tls if self.tls else None
            _, up = await loop.create_connection(
                lambda: Upstream(self), sock=sock, ssl=tls, server_hostname=dest[0] if tls else None
            )
        except OSError:
            sock.close()
            self.close()
            return
        self.up = up
        assert up.t is not None
        up.t.write(head)

    def send(self, data: bytes) -> None:
        if self.t is not None and not self.t.is_closing():
            self.t.write(data)

    def done(self) -> None:
        self.busy = False
        self.next()

    def pause_writing(self) -> None:
        if self.up is not None and self.up.t is not None:
            self.up.t.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.t is not None:
            self.up.t.resume_reading()

    def close(self) -> None:
        if self.t is not None:
            self.t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.t is not None:
            self.up.t.close()


class Floor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.leaves = Leaves(args.ca_cert, args.ca_key)
        self.upstream_tls = ssl.create_default_context(cafile=args.upstream_ca)
        self.egress = itertools.cycle(args.egress.split(","))
        self.sessions = itertools.count(1)
        self.events = None
        if args.our_heads_and_logs:
            global WORK
            from demux_proxy import log
            from demux_proxy.http1 import headers, parser, writer

            WORK = (parser, headers, writer, log)
            self.events = log.EventLog()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--egress", required=True, help="comma-separated source addresses")
    ap.add_argument("--upstream-ca", required=True)
    ap.add_argument("--ca-cert", required=True)
    ap.add_argument("--ca-key", required=True)
    ap.add_argument("--our-heads-and-logs", action="store_true",
                    help="parse and rebuild both heads, write both log lines, with demux-proxy's modules")
    args = ap.parse_args()
    floor = Floor(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(floor), "127.0.0.1", args.port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
