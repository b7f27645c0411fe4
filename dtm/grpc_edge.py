"""What every gRPC server of the project shares: limits, health checking, reflection, shutdown."""

from __future__ import annotations

import asyncio
import errno
import heapq
import inspect
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, runtime_checkable

import grpc
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dtm import limits
from dtm.records import ReplayError
from dtm.wal import LogCorruptedError, LogNewerFormatError

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", limits.MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", limits.MESSAGE_BYTES_MAX),
    ("grpc.so_reuseport", 0),
    # Calls waiting for the server's code: see limits.CALLS_PENDING_MAX.
    ("grpc.server.max_pending_requests", limits.CALLS_PENDING_MAX),
    ("grpc.server.max_pending_requests_hard_limit", limits.CALLS_PENDING_MAX),
]

MessageT = TypeVar("MessageT", bound=Message)

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", limits.MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", limits.MESSAGE_BYTES_MAX),
    # Reconnect quickly after a peer restarts (crash recovery), instead of the 1 s+ default.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Trailing metadata of an operator's force or forget a participant refused because its
# coordinator's answer forbids it (breaking atomicity, or losing a heuristic outcome the
# coordinator has not heard of): `dtm force` and `dtm branches forget` exit EXIT_UNSAFE on it.
UNSAFE_METADATA_KEY = "dtm-unsafe"

# A google.rpc.Code value, as a batched answer carries one per item -> its grpc.StatusCode.
STATUS_OF_CODE = {status.value[0]: status for status in grpc.StatusCode}

# A status message travels as metadata, which gRPC caps (8 KB soft, 16 KB hard, after
# percent-encoding: up to 12 bytes per character). Past it the call fails with
# RESOURCE_EXHAUSTED "metadata size exceeds", and the caller never sees the real error.
STATUS_DETAILS_CHARS_MAX = 600


def status_details(message: str) -> str:
    """`message`, cut to what a status can carry: an error that echoes what a caller sent (a
    100,000-character type URL) must still arrive as itself."""
    if len(message) <= STATUS_DETAILS_CHARS_MAX:
        return message
    cut = len(message) - STATUS_DETAILS_CHARS_MAX
    return f"{message[:STATUS_DETAILS_CHARS_MAX]}... ({cut} more characters)"


# Unknown values an enum_problem names: a repeated field may hold a million of them.
ENUM_VALUES_SHOWN_MAX = 5


def that_fit(messages: Iterable[MessageT]) -> tuple[list[MessageT], bool]:
    """The first of `messages` that fit one answer together (a repeated field of a list
    answer, within ANSWER_BYTES_MAX), and whether any was left out. Lazy: no message past the
    first that does not fit is drawn. Over the message limit, the call failed
    (RESOURCE_EXHAUSTED) with nothing listed."""
    fitted: list[MessageT] = []
    size = 0
    for message in messages:
        size += message.ByteSize() + limits.REPEATED_ELEMENT_FRAMING_BYTES
        if size > limits.ANSWER_BYTES_MAX:
            return fitted, True
        fitted.append(message)
    return fitted, False


def enum_problem(values: Iterable[int], enum: EnumTypeWrapper, what: str) -> str | None:
    """What is wrong with `values` of a repeated enum field (numbers its type does not
    define: a newer client, or garbage), or None. The known names (what to send instead)
    come before the unknown values, of which the smallest few are named: the status is cut
    at STATUS_DETAILS_CHARS_MAX, at its end."""
    unknown = set(values) - set(enum.values())
    if not unknown:
        return None
    shown = ", ".join(map(str, heapq.nsmallest(ENUM_VALUES_SHOWN_MAX, unknown)))
    more = len(unknown) - ENUM_VALUES_SHOWN_MAX
    return (
        f"unknown {what} (known: {', '.join(enum.keys())}): {shown}"
        f"{f' and {more} more' if more > 0 else ''}"
    )


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> NoReturn:
    """End the call with `code` and `message` (cut to fit: see STATUS_DETAILS_CHARS_MAX)."""
    await context.abort(code, status_details(message))
    raise AssertionError("unreachable: abort raises")


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> grpc.aio.Server:
    """A server with the project's limits; `interceptors` (authorization, see dtm.security)
    run on every call, in order, then the refusal of undecodable requests."""
    # Last, so that a caller who may not call a method is told so before anything about its
    # request: the interceptors before it wrap the handler it returns, deserializer included.
    chain = [*interceptors, UndecodableRequestInterceptor()]
    return grpc.aio.server(interceptors=chain, options=SERVER_OPTIONS)


# The stubs make these generic; at run time they are plain classes.
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    ServerInterceptor = grpc.aio.ServerInterceptor
Context = grpc.aio.ServicerContext[Any, Any]


class UndecodableRequestInterceptor(ServerInterceptor):
    """Refuses a request its method cannot decode (a string field holding invalid UTF-8, or
    bytes that are not the message at all) with INVALID_ARGUMENT naming the message.

    gRPC decodes a request before any servicer code runs, and answers a decoding failure
    with UNKNOWN "Unexpected <class 'DecodeError'>" and a logged traceback. Here each
    handler's deserializer hands back an _Undecodable instead of raising, and its behaviour
    refuses one before running.
    """

    def __init__(self) -> None:
        # method -> (handler, the same handler refusing undecodable requests). gRPC looks a
        # handler up anew for every call; the wrapped one is built once per method. Only
        # methods that exist get an entry, so this is bounded by the services registered.
        self._tolerant: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._tolerant.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        tolerant = _tolerant(handler)
        self._tolerant[method] = (handler, tolerant)
        return tolerant


class _Undecodable:
    """What a tolerant deserializer returns for bytes it cannot decode: why, in words."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


async def _refuse(request: _Undecodable, context: Context) -> NoReturn:
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.problem)


def _tolerant(handler: Handler) -> Handler:
    """`handler`, refusing a request it cannot decode instead of failing with UNKNOWN.

    A handler without a deserializer (raw bytes), one that is not gRPC's own named tuple, or
    one with a synchronous behaviour (which gRPC runs on a thread) is returned as it is."""
    deserialize = handler.request_deserializer
    replace = getattr(handler, "_replace", None)
    if deserialize is None or replace is None:
        return handler
    kind = ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )
    wrap = _with_checked_requests if handler.request_streaming else _with_checked_request
    behavior = wrap(getattr(handler, kind))
    if behavior is None:
        return handler
    tolerant: Handler = replace(
        request_deserializer=_tolerant_deserializer(deserialize), **{kind: behavior}
    )
    return tolerant


def _tolerant_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # A generated handler's deserializer is the request class's FromString.
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "message")
    # The upb decoder starts its message with this; the status names the type once.
    said_already = f"Error parsing message with type '{name}': "

    def tolerant_deserialize(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            why = str(error).removeprefix(said_already)
            return _Undecodable(f"the request is not a valid {name}: {why}")

    return tolerant_deserialize


def _with_checked_request(behavior: Any) -> Any:
    """A unary-request behaviour that first refuses an _Undecodable request, or None."""
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if type(request) is _Undecodable:
                await _refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return checked_stream
    if inspect.iscoroutinefunction(behavior):

        async def checked(request: Any, context: Context) -> Any:
            if type(request) is _Undecodable:
                await _refuse(request, context)
            return await behavior(request, context)

        return checked
    return None


def _with_checked_requests(behavior: Any) -> Any:
    """A streaming-request behaviour whose requests are checked as they are read, or None."""
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behavior(_checked(requests, context), context):
                yield response

        return checked_stream
    if inspect.iscoroutinefunction(behavior):

        async def checked(requests: Any, context: Context) -> Any:
            return await behavior(_checked(requests, context), context)

        return checked
    return None


async def _checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Undecodable:
            await _refuse(request, context)
        yield request


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Standard grpc.health.v1 (every service SERVING) and server reflection."""
    names = list(service_names)
    # grpc-stubs predates the aio health servicer; it exists at runtime since grpcio 1.38.
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ["", *names]:
        # The aio servicer's set() is a coroutine; schedule it on the running loop.
        asyncio.get_running_loop().create_task(health_servicer.set(name, serving))
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )


def bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind to host:port (port 0 picks a free one); a port already in use is a clear error.
    With `credentials` the port speaks TLS only (dtm.security.server_credentials)."""
    held = _partly_held(address)
    if held:
        raise OSError(
            f"cannot listen on {address}: {', '.join(held)} is in use by another process, and "
            f"gRPC would serve on the other addresses of {address.rpartition(':')[0]} alone "
            "(clients of that name could reach either process); stop that process, or choose "
            "another port (or an address, such as 127.0.0.1, that names one socket)"
        )
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        why = _why_not_bound(address, credentials is not None)
        raise OSError(f"cannot listen on {address}: {why} ({error})") from None
    if port == 0:
        raise OSError(
            f"cannot listen on {address}: {_why_not_bound(address, credentials is not None)}"
        )
    return port


def _partly_held(address: str) -> list[str]:
    """The sockets of `address` that another process listens on, when it holds some of the
    addresses its host names but not all; else [] (none held, or all: then gRPC's own bind
    fails, see _why_not_bound). gRPC binds every address a name resolves to ("localhost": both
    loopbacks) and succeeds if any one binds, so a coordinator on localhost:P would serve on
    [::1]:P while a participant holds 127.0.0.1:P, and say nothing."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdecimal() or int(port_text) == 0:
        return []  # a free port is chosen for all of them at once
    hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host]  # as gRPC binds it
    sockets = []
    for name in hosts:
        try:
            sockets += socket.getaddrinfo(name or None, int(port_text), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):  # not a name here (no IPv6, say): gRPC skips it too
            continue
    held = [where for family, _, _, _, where in sockets if _in_use(family, where)]
    if len(held) == len(sockets):
        return []
    return [_host_port(str(where[0]), int(where[1])) for where in held]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _in_use(family: int, where: Any) -> bool:
    """Whether another socket listens on `where`: a bind with SO_REUSEADDR, as gRPC's, fails
    only then (a port in TIME_WAIT after a restart is free)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def _why_not_bound(address: str, tls: bool = False) -> str:
    """gRPC says only that binding failed: tell a port in use from a host that is not this
    machine's (or not an address at all), and, with TLS, from credentials gRPC rejected (a
    key that is not the certificate's, say)."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(where)
    except (OSError, UnicodeError) as error:  # gaierror: not a name; UnicodeError: not IDNA
        why = getattr(error, "strerror", None) or error
        return f"{host!r} is not an address of this machine ({why})"
    if tls:
        return (
            "is the port already in use? Or gRPC rejected the TLS credentials (CA, "
            "certificate and key must be PEM, the key the certificate's)"
        )
    return "is the port already in use?"


# SIGHUP (a closed terminal, `kill -HUP` meant as a reload) stops a server as SIGTERM does:
# it has no configuration to reload, and SIGHUP's default action killed it at once, skipping
# the graceful stop (phase 2 finished, branches in doubt counted) that its log line reports.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)


# Young-generation GC threshold for server processes. The default 700 runs the collector
# constantly: a transaction allocates thousands of short-lived objects, and a burst of them
# alive at once crosses 700 (make bench measured about +10-15% throughput away from it). A
# large threshold has the opposite cost: each collection traverses every object that arrived
# since the last one, on the event loop, and under load about five per incoming call are
# gRPC's cyclic garbage. Measured on 2026-11-29 in 120-second runs under `make bench` load
# (docs/architecture.md, section 12): at 50,000 the longest collections were 114-132 ms in
# the coordinator and 260-310 ms in the worst participant; at 10,000, 16-22 ms and 51-64, with
# p99 139-146 ms against 163-199; 5,000 spent nearly twice the coordinator's collection time
# of 10,000 for the same p99. Memory stays bounded either way: objects without cycles are
# freed by reference counting.
GC_YOUNG_THRESHOLD = 10_000


class Server(Protocol):
    async def start(self) -> object: ...  # (the port it bound, say)
    async def stop(self) -> None: ...


@runtime_checkable
class Failing(Protocol):
    """A server that may learn, once serving, that it must not go on (a participant whose
    registration the coordinator refused for good, or that another incarnation replaced):
    `failed` is set, `failure` says why."""

    failed: asyncio.Event
    failure: str


def run_server(build: Callable[[], Server]) -> None:
    """Build, start and serve a server process until SIGTERM, SIGHUP or Ctrl-C, then stop it. A
    failure to start that names its cause (a port in use, a data directory held by another
    process, a corrupted log or one whose records this build cannot replay), or a server that
    reports it failed (`Failing`), ends the process with that one line on stderr and exit
    status 1; a failure after it started keeps its traceback."""

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            server = build()  # opens (and recovers) its log
            # Before the start, which logs "serving": a signal sent as soon as that line is
            # read (by a test, or `up` then `down` at once) came before the handlers and
            # killed the process by its default action. One during the start stops it after.
            install_stop_signals(stop)
            await server.start()  # binds its port
        except (OSError, LogCorruptedError, LogNewerFormatError, ReplayError) as error:
            raise _CannotStart(f"error: {error}") from error
        waits = [asyncio.ensure_future(stop.wait())]
        if isinstance(server, Failing):
            waits.append(asyncio.ensure_future(server.failed.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        await server.stop()
        if isinstance(server, Failing) and server.failed.is_set():
            raise _CannotStart(f"error: {server.failure}")

    try:
        asyncio.run(serve())
    except _CannotStart as cannot:
        sys.exit(str(cannot))


class _CannotStart(Exception):
    pass


def use_fast_event_loop() -> None:
    """Tune a server process for the hot path: uvloop when installed (the `fast` extra), and a
    garbage collector that does not scan the long-lived startup objects again and again."""
    import gc

    gc.freeze()  # everything imported so far lives forever: keep it out of every collection
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
