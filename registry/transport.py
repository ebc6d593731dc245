"""The client's sans-IO core and its two drivers (``httpx.Client`` and ``httpx.AsyncClient``).

Every client operation is written once, as a *flow*: a generator that yields effects and receives
their results:

- :class:`Send` — one HTTP request; the driver answers with the ``httpx.Response`` (any status; the
  flow decides), or throws the ``httpx.TransportError`` into the flow;
- :class:`Stream` — a GET whose body the driver pumps, chunk by chunk, into a writer the flow's
  ``sink`` returns after seeing the status and headers (downloads);
- :class:`Sleep` — a pause (retry backoff, job polling);
- :class:`Blocking` — local work that takes a while (hashing a file): the async driver runs it in a
  thread.

:class:`Core` holds what both drivers share: the retry policy (:func:`transient`, :class:`Backoff`)
and the request flows built on :class:`Send` (:meth:`Core.request`, :meth:`Core.call`). An
:func:`operation` (a flow method of a client class) is bound by the driver it is read from:
``SyncDriver`` runs the flow to its result, ``AsyncDriver`` returns a coroutine that does, so the
sync and async clients have one implementation of each method. :func:`paged` does the same for
operations that yield items page by page (an iterator, or an async iterator).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import httpx
from pydantic import TypeAdapter

from .client_errors import RegistryAPIError, ServerUnreachable, error_from_response

P = ParamSpec("P")
T = TypeVar("T")

RETRY_STATUSES = frozenset({502, 503, 504})  # a proxy or a restarting server: worth another try
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_FIRST_DELAY = 0.5  # seconds; doubles after each failure of an outage
RETRY_MAX_DELAY = 5.0
# Raised before the request reached the server: safe to repeat whatever the request does.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


# ----------------------------------------------------------------------------- effects


@dataclass
class Send:
    """One HTTP request (path relative to the API root)."""

    method: str
    path: str
    params: Any = None
    json: Any = None
    content: bytes | Iterator[bytes] | None = None
    headers: dict[str, str] | None = None
    timeout: float | None = None

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {k: v for k, v in (("params", self.params), ("json", self.json),
                                                ("content", self.content), ("headers", self.headers)) if v is not None}
        if self.timeout is not None:
            kw["timeout"] = self.timeout
        return kw


Writer = Callable[[bytes], None]


@dataclass
class Stream:
    """A GET whose body goes to ``sink(response)``'s writer (when it returns one, for a status < 400);
    otherwise the body is read into the response. The driver answers with the response."""

    path: str
    headers: dict[str, str] = field(default_factory=dict)
    sink: Callable[[httpx.Response], Writer | None] = lambda _r: None


@dataclass
class Sleep:
    seconds: float


@dataclass
class Blocking:
    """Local work the flow waits for (file hashing): run in a thread by the async driver."""

    fn: Callable[[], Any]


Effect = Send | Stream | Sleep | Blocking
Flow = Generator[Effect, Any, T]


# ----------------------------------------------------------------------------- retry policy


def transient(error: BaseException, idempotent: bool) -> bool:
    """Whether a failed request may be repeated: never after a 4xx; after a connection that was
    never made, always; after one that broke (or a 502/503/504), only if repeating it is harmless."""
    if isinstance(error, NOT_SENT):
        return True
    if isinstance(error, httpx.TransportError):
        return idempotent
    if isinstance(error, RegistryAPIError):
        return idempotent and error.status in RETRY_STATUSES
    return False


def describe(error: BaseException) -> str:
    if isinstance(error, RegistryAPIError):
        return f"{error.status} {error.code}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def unreachable(url: str, error: BaseException, tried: float = 0) -> ServerUnreachable:
    retried = f" (retried for {tried:.0f}s)" if tried else ""
    return ServerUnreachable(f"cannot reach the registry at {url}: {describe(error)}{retried}",
                             {"url": url, "cause": describe(error)})


class Backoff:
    """Backoff for one operation: delays of 0.5, 1, 2, 4, 5, 5 ... seconds, until ``budget``
    seconds have passed since the first failure of the current outage (a success resets it)."""

    def __init__(self, budget: float, what: str, notify: Callable[[str], None], url: str) -> None:
        self.budget, self.what, self.notify, self.url = budget, what, notify, url
        self.reset()

    def reset(self) -> None:
        self._since: float | None = None
        self._failures = 0

    def wait(self, error: BaseException) -> Flow[None]:
        """Sleep before the next try; raise the client's exception for ``error`` when the budget is spent."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        left = self.budget - (now - self._since)
        if left <= 0:
            if isinstance(error, httpx.TransportError):
                raise unreachable(self.url, error, self.budget) from error
            raise error
        delay = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** self._failures, left)
        self._failures += 1
        self.notify(f"registry: {self.what}: {describe(error)}; retrying in {delay:.1f}s "
                    f"(gives up in {left:.0f}s)")
        yield Sleep(delay)


def check(r: httpx.Response) -> httpx.Response:
    """``r``, or the client's exception for its error status."""
    if r.status_code >= 400:
        raise error_from_response(r.status_code, r.content)
    return r


def parse(model: type[T], r: httpx.Response) -> T:
    """A response body as ``model`` (a pydantic model, or a type such as ``list[Model]``)."""
    return _adapter(model).validate_json(r.content)  # type: ignore[no-any-return, arg-type]


@functools.cache
def _adapter(model: Any) -> TypeAdapter[Any]:
    return TypeAdapter(model)


class Core:
    """State and request flows shared by both drivers."""

    url: str
    retry_seconds: float
    _on_retry: Callable[[str], None]

    def _retry(self, what: str) -> Backoff:
        return Backoff(self.retry_seconds, what, self._on_retry, self.url)

    def _fail(self, error: BaseException) -> BaseException:
        """What to raise for ``error`` when it is not retried."""
        return unreachable(self.url, error) if isinstance(error, httpx.TransportError) else error

    def request(self, method: str, path: str, *, idempotent: bool | None = None, what: str | None = None,
                content: bytes | Callable[[], Iterator[bytes]] | None = None, **kw: Any) -> Flow[httpx.Response]:
        """A request, retried while the server is unreachable when that is safe (see :func:`transient`;
        ``idempotent`` defaults to the method's HTTP semantics); raises the client's exception for an
        error answer. A callable ``content`` is called for a fresh body on every try."""
        idem = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
        retry = self._retry(what or f"{method} {path}")
        while True:
            body = content() if callable(content) else content
            try:
                return check((yield Send(method, path, content=body, **kw)))
            except (httpx.TransportError, RegistryAPIError) as e:
                if not transient(e, idem):
                    raise self._fail(e) from e
                yield from retry.wait(e)

    @overload
    def call(self, model: None, method: str, path: str, **kw: Any) -> Flow[None]: ...
    @overload
    def call(self, model: type[T], method: str, path: str, **kw: Any) -> Flow[T]: ...

    def call(self, model: type[T] | None, method: str, path: str, **kw: Any) -> Flow[T | None]:
        """:meth:`request`, its body parsed as ``model`` (None: a body-less answer, returns None)."""
        r = yield from self.request(method, path, **kw)
        return None if model is None or r.status_code == 204 else parse(model, r)


# ----------------------------------------------------------------------------- binding flows to drivers


class operation(Generic[P, T]):  # noqa: N801 - used as a decorator, like property
    """A flow method: read from a sync client it runs to its result; from an async client it is a
    coroutine function; read from the class it is the flow function itself (for composing flows:
    ``yield from Client.get_version(self, ref)``)."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Flow[T]]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[Concatenate[Any, P], Flow[T]]: ...
    @overload
    def __get__(self, obj: SyncDriver, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: AsyncDriver, owner: type) -> Callable[P, Awaitable[T]]: ...

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self.fn
        fn = self.fn

        @functools.wraps(fn)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return obj.drive(fn(obj, *args, **kwargs))

        return bound


Pages = Callable[[str | None], Flow[tuple[list[Any], str | None]]]


class paged(Generic[T]):  # noqa: N801
    """An operation that lists items over pages: the method returns ``pages``, a function of the
    cursor giving a flow of (items, next cursor). A sync client returns an iterator over every
    item, an async client an async iterator."""

    def __init__(self, fn: Callable[..., Callable[[str | None], Flow[tuple[list[T], str | None]]]]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: SyncDriver, owner: type) -> Callable[..., Iterator[T]]: ...
    @overload
    def __get__(self, obj: AsyncDriver, owner: type) -> Callable[..., AsyncIterator[T]]: ...

    def __get__(self, obj: Any, owner: type) -> Any:
        fn = self.fn

        @functools.wraps(fn)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return obj.iterate(fn(obj, *args, **kwargs))

        return bound


# ----------------------------------------------------------------------------- the drivers


def advance(flow: Flow[Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``flow`` with the last effect's result (or throw its exception in): (False, the next
    effect) or (True, the flow's result)."""
    try:
        return False, flow.throw(error) if error is not None else flow.send(value)
    except StopIteration as stop:
        return True, stop.value


class SyncDriver(Core):
    """Runs flows with an ``httpx.Client``."""

    _http: httpx.Client

    def _attempt(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request, whatever its status; raises ``httpx.TransportError``."""
        return self._http.request(method, path, **kw)

    def _stream(self, effect: Stream) -> httpx.Response:
        with self._http.stream("GET", effect.path, headers=effect.headers) as r:
            write = effect.sink(r) if r.status_code < 400 else None
            if write is None:
                r.read()
                return r
            for chunk in r.iter_bytes():  # as received: no re-chunking copy
                write(chunk)
            return r

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            return self._attempt(effect.method, effect.path, **effect.kwargs())
        if isinstance(effect, Stream):
            return self._stream(effect)
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        return effect.fn()

    def drive(self, flow: Flow[T]) -> T:
        """Run ``flow`` to its result; an effect's exception is thrown into the flow."""
        outcome: tuple[Any, BaseException | None] = (None, None)
        while True:
            done, step = advance(flow, *outcome)
            if done:
                return step  # type: ignore[no-any-return]
            try:
                outcome = (self._perform(step), None)
            except BaseException as e:  # noqa: BLE001 - the flow decides (a push aborts its draft)
                outcome = (None, e)

    def iterate(self, pages: Pages) -> Iterator[Any]:
        cursor: str | None = None
        while True:
            items, cursor = self.drive(pages(cursor))
            yield from items
            if not cursor:
                return


class AsyncDriver(Core):
    """Runs flows with an ``httpx.AsyncClient``. Blocking effects (hashing) run in a thread; upload
    bodies are read from their files in the event loop's thread, a chunk at a time."""

    _http: httpx.AsyncClient

    async def _attempt(self, method: str, path: str, **kw: Any) -> httpx.Response:
        content = kw.get("content")
        if content is not None and not isinstance(content, bytes | bytearray):
            kw["content"] = _aiter(content)
        return await self._http.request(method, path, **kw)

    async def _stream(self, effect: Stream) -> httpx.Response:
        async with self._http.stream("GET", effect.path, headers=effect.headers) as r:
            write = effect.sink(r) if r.status_code < 400 else None
            if write is None:
                await r.aread()
                return r
            async for chunk in r.aiter_bytes():
                write(chunk)
            return r

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            return await self._attempt(effect.method, effect.path, **effect.kwargs())
        if isinstance(effect, Stream):
            return await self._stream(effect)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        return await asyncio.to_thread(effect.fn)

    async def drive(self, flow: Flow[T]) -> T:
        outcome: tuple[Any, BaseException | None] = (None, None)
        while True:
            done, step = advance(flow, *outcome)
            if done:
                return step  # type: ignore[no-any-return]
            try:
                outcome = (await self._perform(step), None)
            except BaseException as e:  # noqa: BLE001
                outcome = (None, e)

    async def iterate(self, pages: Pages) -> AsyncIterator[Any]:
        cursor: str | None = None
        while True:
            items, cursor = await self.drive(pages(cursor))
            for item in items:
                yield item
            if not cursor:
                return


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk

