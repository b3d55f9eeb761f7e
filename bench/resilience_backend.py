#!/usr/bin/env python3
"""A tiny HTTP/1.1 keep-alive backend for bench/resilience.sh (python3 stdlib only).

Usage: resilience_backend.py [--listen ADDR] [--delay-ms MS] [--fail-every N] [--name NAME]

  --listen ADDR     address to bind (default 127.0.0.1:0); the bound address is printed
                    as the first stdout line: `listening ADDR`
  --delay-ms MS     answer every request after MS milliseconds (default 0)
  --fail-every N    every Nth request (counted over all connections) is answered with
                    503 instead of 200 (default 0: never)
  --name NAME       sent back as `x-served-by: NAME` (default: the bound address)

Answers every request with `200 OK` and the 13-byte body `hello trellis` (like
trellis-bench-backend), keeps connections alive (HTTP/1.1 default, HTTP/1.0 with
`Connection: keep-alive`), drains request bodies (Content-Length or chunked).

`GET /__stats` answers JSON {"name", "requests", "failed"} and is not counted (the
benchmark reads it to see how requests were spread over the instances).

SIGTERM/SIGINT: stop accepting, print the counters to stderr, exit 0.
It is meant for a few hundred requests per second, not for throughput benchmarks.
"""

import argparse
import asyncio
import json
import signal
import sys

OK_BODY = b"hello trellis"
FAIL_BODY = b"injected failure\n"
MAX_HEAD = 64 * 1024


class Backend:
    def __init__(self, name, delay, fail_every):
        self.name = name
        self.delay = delay
        self.fail_every = fail_every
        self.requests = 0
        self.failed = 0

    def stats(self):
        return {"name": self.name, "requests": self.requests, "failed": self.failed}

    async def handle(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    await self.respond(writer, 400, b"bad request\n", close=True)
                    return
                method, target, version = parts
                headers = {}
                for line in lines[1:]:
                    if not line:
                        continue
                    k, sep, v = line.partition(":")
                    if not sep:
                        await self.respond(writer, 400, b"bad header\n", close=True)
                        return
                    headers[k.strip().lower()] = v.strip()
                conn = headers.get("connection", "").lower()
                if version == "HTTP/1.0":
                    close = "keep-alive" not in conn
                else:
                    close = "close" in conn
                if not await self.drain_body(reader, headers):
                    return
                if target == "/__stats":
                    body = (json.dumps(self.stats()) + "\n").encode()
                    await self.respond(writer, 200, body, close, ctype="application/json")
                else:
                    self.requests += 1
                    fail = self.fail_every > 0 and self.requests % self.fail_every == 0
                    if fail:
                        self.failed += 1
                    if self.delay > 0:
                        await asyncio.sleep(self.delay)
                    if fail:
                        await self.respond(writer, 503, FAIL_BODY, close, head_only=method == "HEAD")
                    else:
                        await self.respond(writer, 200, OK_BODY, close, head_only=method == "HEAD")
                if close:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def drain_body(self, reader, headers):
        """Reads and discards the request body; False if the connection is unusable."""
        try:
            te = headers.get("transfer-encoding", "").lower()
            if "chunked" in te:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        # trailers until an empty line
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass
                        return True
                    await reader.readexactly(size + 2)
            n = int(headers.get("content-length", "0") or "0")
            if n > 0:
                await reader.readexactly(n)
            return True
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False

    async def respond(self, writer, status, body, close, ctype="text/plain", head_only=False):
        reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}.get(status, "")
        head = (f"HTTP/1.1 {status} {reason}\r\n"
                f"content-type: {ctype}\r\n"
                f"content-length: {len(body)}\r\n"
                f"x-served-by: {self.name}\r\n")
        if close:
            head += "connection: close\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + (b"" if head_only else body))
        await writer.drain()


def parse_addr(s):
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"invalid address {s!r}: expected IP:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", type=parse_addr, default=("127.0.0.1", 0))
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    if args.delay_ms < 0 or args.fail_every < 0:
        ap.error("--delay-ms and --fail-every must be >= 0")

    backend = Backend(args.name, args.delay_ms / 1000.0, args.fail_every)

    def on_conn(reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return backend.handle(reader, writer)

    server = await asyncio.start_server(on_conn, args.listen[0], args.listen[1],
                                        limit=MAX_HEAD, backlog=1024, reuse_address=True)
    host, port = server.sockets[0].getsockname()[:2]
    if not backend.name:
        backend.name = f"{host}:{port}"
    print(f"listening {host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # No wait_closed(): from Python 3.12 it waits for keep-alive clients to hang up.
    server.close()
    print(f"stopping: {json.dumps(backend.stats())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
