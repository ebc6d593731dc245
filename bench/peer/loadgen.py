"""A bounded load generator: a fixed number of operations at a fixed concurrency, then it stops.

Each of ``concurrency`` tasks owns one keep-alive HTTP/1.1 connection and takes the next
operation index until ``total`` have been issued. An *operation* is an async function of
``(conn, index)`` that sends one or more requests and returns how many it sent; its latency is
measured around the whole operation (``time.perf_counter``), every latency is kept, and the
percentiles are exact order statistics (nearest rank) over all of them.

The client is a minimal HTTP/1.1 implementation on asyncio streams (Content-Length and chunked
bodies, reconnect when the server closes): it costs far less CPU per request than httpx or
aiohttp, which matters here because the generator shares the machine's two cores with the
servers under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class HTTPError(Exception):
    def __init__(self, status: int, method: str, path: str, body: bytes) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:300]!r}")
        self.status = status


class Conn:
    """One keep-alive HTTP/1.1 connection to ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str) -> None:
        u = urlsplit(base_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self._host_header = f"{self.host}:{self.port}".encode()
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._r, self._w = await asyncio.open_connection(self.host, self.port)

    @property
    def is_open(self) -> bool:
        return self._w is not None

    async def close(self) -> None:
        if self._w is not None:
            self._w.close()
            with contextlib.suppress(OSError):
                await self._w.wait_closed()
        self._r = self._w = None

    async def request(self, method: str, path: str, body: bytes | None = None,
                      content_type: str = "application/json") -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self._host_header]
        if body is not None:
            head.append(f"Content-Type: {content_type}\r\nContent-Length: {len(body)}".encode())
        raw = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
        for attempt in (0, 1):
            if self._w is None:
                await self._open()
            assert self._r is not None and self._w is not None
            try:
                self._w.write(raw)
                return await self._read_response()
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed an idle keep-alive connection: retry once on a new one.
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _read_response(self) -> tuple[int, bytes]:
        assert self._r is not None
        head = await self._r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self._r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._r.readuntil(b"\r\n")
                    break
                parts.append(await self._r.readexactly(size))
                await self._r.readexactly(2)
            data = b"".join(parts)
        elif length is not None:
            data = await self._r.readexactly(length)
        else:
            data = await self._r.read()
            close = True
        if close:
            await self.close()
        return status, data

    async def call(self, method: str, path: str, payload: Any = None, *, raw: bytes | None = None,
                   content_type: str = "application/json", ok: tuple[int, ...] = (200, 201)) -> Any:
        """A request whose response must have a status in ``ok``; returns the decoded JSON body."""
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
        status, data = await self.request(method, path, body, content_type)
        if status not in ok:
            raise HTTPError(status, method, path, data)
        return json.loads(data) if data else None


Operation = Callable[[Conn, int], Awaitable[int]]

OPEN_GAP_S = 0.01


async def open_all(conns: list[Conn]) -> None:
    """Open the connections one at a time, a few ms apart.

    Both servers run several worker processes on one shared listening socket. Opened in a burst
    (every task's first request at the same instant), the connections queue in the backlog and the
    first worker to wake accepts all of them: measured, 16 of 16 keep-alive connections on one of
    two workers for both servers, i.e. one busy process per system. Opened apart, every accept
    wakes every idle worker and any of them may win, so the connections spread over the workers
    (``run.py`` reports the busiest worker's share of the server CPU to show how well)."""
    for c in conns:
        if not c.is_open:
            await c._open()
            await asyncio.sleep(OPEN_GAP_S)


@dataclass
class Result:
    name: str
    ops: int
    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, one per successful operation
    errors: int = 0
    first_error: str | None = None

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """Exact percentile (nearest rank) of the operation latencies, in milliseconds."""
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        k = max(1, math.ceil(q / 100 * len(xs)))
        return xs[k - 1] * 1000

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "ops": self.ops, "requests": self.requests, "seconds": round(self.seconds, 3),
                "ops_per_s": round(self.ops_per_s, 1), "req_per_s": round(self.req_per_s, 1),
                "p50_ms": round(self.pct(50), 2), "p99_ms": round(self.pct(99), 2), "errors": self.errors,
                "first_error": self.first_error}


async def run(base_url: str, op: Operation, *, total: int, concurrency: int, start: int = 0,
              name: str = "", conns: list[Conn] | None = None) -> Result:
    """Issue operations ``start .. start+total-1`` with ``concurrency`` in flight; stop after the last.
    ``conns`` (one per concurrent task) are reused and left open; otherwise new ones are closed at the end."""
    own = conns is None
    conns = conns or [Conn(base_url) for _ in range(concurrency)]
    result = Result(name, 0, 0, 0.0)
    next_i = start
    end = start + total

    async def worker(conn: Conn) -> None:
        nonlocal next_i
        while next_i < end:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                n = await op(conn, i)
            except Exception as e:  # counted and reported, never hidden
                result.errors += 1
                result.first_error = result.first_error or f"{type(e).__name__}: {e}"[:400]
                await conn.close()
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.ops += 1
            result.requests += n

    await open_all(conns)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        result.seconds = time.perf_counter() - t0
        if own:
            for c in conns:
                await c.close()
    return result


async def measure(base_url: str, op: Operation, *, total: int, warmup: int, concurrency: int, start: int = 0,
                  name: str = "") -> Result:
    """``warmup`` operations (discarded: they also open the connections), then ``total`` timed ones on
    the same connections."""
    conns = [Conn(base_url) for _ in range(concurrency)]
    try:
        if warmup:
            await run(base_url, op, total=warmup, concurrency=concurrency, start=start, name=name + " (warm-up)",
                      conns=conns)
        return await run(base_url, op, total=total, concurrency=concurrency, start=start + warmup, name=name,
                         conns=conns)
    finally:
        for c in conns:
            await c.close()
