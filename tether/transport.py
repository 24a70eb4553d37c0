"""Every gRPC server and channel in Tether, made from one security value (DESIGN §13).

A :class:`Security` says how a process talks to the others of its run: with the run's token
(:class:`TokenBook`) on every call, and over TLS (:class:`TlsFiles`), mutual when a CA is given.
Shards, the workers' health servers, workers, the driver, its evaluator and probes, and the
benches all make their servers with :meth:`Security.server` and their channels with
:meth:`Security.channel`; nothing else in Tether calls ``grpc.server`` or ``grpc.*_channel``
(`tests/test_transport.py` checks the source), so no call site can forget either.

- **Tokens.** A client interceptor (:class:`_TokenChannel`) adds ``authorization: Bearer
  <token>`` to every call's metadata (gRPC's call credentials would be dropped silently on an
  insecure channel). A server interceptor refuses a call whose token is missing or not
  accepted with UNAUTHENTICATED before any handler runs, so nothing changes and no same-host
  segment is mapped; the standard health service stays open for liveness probes (it says
  nothing about the model). The book re-reads the run's tokens from the store now and then, so
  a rotation (``tether run rotate-token``) reaches running members; a shard that meets a token
  it does not know re-reads at once (at most every :data:`MISS_REFRESH_S`) before refusing.
- **TLS.** With a certificate and key, servers listen with TLS; with a CA too, they require a
  client certificate signed by it and clients verify servers against it. Servers re-read the
  files for each new connection when they changed (gRPC's dynamic server credentials), and each
  new channel reads them again, so rotated certificates apply without restarting members.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from tether.store.secrets import DEFAULT_PROPAGATE_S, RunToken, accepted, current

if TYPE_CHECKING:
    from tether.config import RunConfig
    from tether.store import Store

log = logging.getLogger("tether.transport")

OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # answered without a token: liveness probes
REFRESH_S = 2.0  # how often a member re-reads its run's tokens from the store
MISS_REFRESH_S = 0.5  # at most this often, a shard re-reads them on meeting an unknown token
# A client whose tokens are older than this re-reads them before a call: a rotation's new token
# is used from DEFAULT_PROPAGATE_S on, and the old one stays accepted for the grace period.
STALE_S = DEFAULT_PROPAGATE_S
AUTH_KEY = "authorization"
Options = Sequence[tuple[str, Any]]


class AuthError(ValueError):
    """A run that cannot be served as asked: no token, or TLS files that cannot be used."""


# -- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: this process's certificate chain and key, and the CA that makes TLS mutual."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    # Clients check a server's certificate against this name instead of the dialled host.
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    @property
    def mutual(self) -> bool:
        return bool(self.ca)

    def check(self) -> TlsFiles:
        """This value, or ValueError naming the flag at fault."""
        if not self.enabled:
            return self
        if not (self.cert and self.key):
            raise ValueError(
                "TLS needs both --tls-cert and --tls-key (and --tls-ca for mutual TLS)"
            )
        for flag, path in (
            ("--tls-cert", self.cert),
            ("--tls-key", self.key),
            ("--tls-ca", self.ca),
        ):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{flag} {path}: no readable file there")
        return self

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.ca).read_bytes() if self.ca else None
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), ca

    def stamp(self) -> tuple[float, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in (self.cert, self.key, self.ca) if p)


def _server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    seen: list[tuple[float, ...]] = []

    def config() -> grpc.ServerCertificateConfiguration:
        cert, key, ca = tls.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC for each new connection: re-read the files only when they changed.
        try:
            stamp = tls.stamp()
            if seen and seen[-1] == stamp:
                return None
            fresh = config()
        except OSError as e:  # a rotation half written: keep serving the last good files
            log.warning("cannot re-read the TLS files (%s); keeping the current ones", e)
            return None
        seen[:] = [stamp]
        return fresh

    first = config()
    seen.append(tls.stamp())
    return grpc.dynamic_ssl_server_credentials(
        first, fetch, require_client_authentication=tls.mutual
    )


def _channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


# -- tokens --------------------------------------------------------------------------------------


class TokenBook:
    """A run's tokens as one process holds them, re-read through ``load`` (the store) every
    ``refresh_s`` in the background, and at once (rate-limited) when a server meets a token it
    does not know. ``load`` None: a fixed list (tests, benches)."""

    def __init__(
        self,
        tokens: Sequence[RunToken],
        load: Callable[[], list[RunToken]] | None = None,
        *,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not tokens:
            raise ValueError("a token book needs at least one token")
        self._tokens = list(tokens)
        self._load, self._refresh_s, self._clock = load, refresh_s, clock
        self._loaded_at = time.monotonic()
        self._missed_at = -math.inf  # when an unknown token last made it re-read the store
        self._lock = threading.Lock()
        self._refreshing = False

    @classmethod
    def fixed(cls, token: str) -> TokenBook:
        return cls([RunToken(token, 0.0, 0.0)])

    def presented(self) -> str:
        """The token a client sends now (the newest in use). A client that has not re-read
        the store for STALE_S (an idle driver before its final read) re-reads it first."""
        if self._load is not None and time.monotonic() - self._loaded_at > STALE_S:
            self._refresh()
        self._refresh_in_background()
        token = current(self._tokens, self._clock())
        if token is None:
            raise AuthError("every token of this run has expired; rotate it again")
        return token

    def accepts(self, token: str) -> bool:
        """Whether a server takes ``token`` now; an unknown one makes it re-read the store
        first, at most every MISS_REFRESH_S (a refresh that fails keeps the tokens held)."""
        self._refresh_in_background()
        if self._matches(token):
            return True
        now = time.monotonic()
        if self._load is None or now - self._missed_at < MISS_REFRESH_S:
            return False
        self._missed_at = now
        self._refresh()
        return self._matches(token)

    def _matches(self, token: str) -> bool:
        wanted = token.encode()
        # Compare with every accepted token, each in constant time.
        hits = [
            hmac.compare_digest(wanted, t.encode()) for t in accepted(self._tokens, self._clock())
        ]
        return any(hits)

    def _refresh_in_background(self) -> None:
        if self._load is None or time.monotonic() - self._loaded_at < self._refresh_s:
            return
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        threading.Thread(target=self._refresh, name="token-refresh", daemon=True).start()

    def _refresh(self) -> None:
        assert self._load is not None
        try:
            tokens = self._load()
            if tokens:
                self._tokens = tokens
        except Exception as e:  # noqa: BLE001 - the store is busy or down: keep what is held
            log.warning("cannot re-read the run's tokens: %s", type(e).__name__)
        finally:
            self._loaded_at = time.monotonic()
            with self._lock:
                self._refreshing = False


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class RunTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without an accepted run token, before any handler runs."""

    def __init__(self, book: TokenBook) -> None:
        self.book = book

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        token = _bearer(details.invocation_metadata)  # type: ignore[attr-defined]
        if token is not None and self.book.accepts(token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        why = "no run token" if token is None else "a run token this run does not accept"
        return _refusal(handler, f"{details.method}: refused, the call carried {why}")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses with UNAUTHENTICATED (the request
    is not even deserialised)."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(deny)  # type: ignore[no-any-return]


class _WithToken:
    """One method of a channel, with the run's token added to every call's metadata."""

    def __init__(self, inner: Any, book: TokenBook) -> None:
        self._inner, self._book = inner, book

    def _metadata(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        given = kwargs.get("metadata") or ()
        return kwargs | {"metadata": (*given, (AUTH_KEY, f"Bearer {self._book.presented()}"))}

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        return self._inner(request, **self._metadata(kwargs))

    def with_call(self, request: Any, **kwargs: Any) -> Any:
        return self._inner.with_call(request, **self._metadata(kwargs))

    def future(self, request: Any, **kwargs: Any) -> Any:
        return self._inner.future(request, **self._metadata(kwargs))


class _TokenChannel(grpc.Channel):
    """The client side of the run token: a channel whose every call carries it.

    It wraps each method's callable when a stub is made, rather than through
    ``grpc.intercept_channel``, whose interceptors make a new callable on the channel at every
    call: on a channel closed under a worker (a replaced shard's, DESIGN §5) that crashes the
    process instead of raising ValueError."""

    def __init__(self, channel: grpc.Channel, book: TokenBook) -> None:
        self._channel, self._book = channel, book

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.unary_unary(method, *args, **kwargs), self._book)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.unary_stream(method, *args, **kwargs), self._book)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.stream_unary(method, *args, **kwargs), self._book)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.stream_stream(method, *args, **kwargs), self._book)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> _TokenChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._channel.close()


# -- the one security value ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Security:
    """How one process's servers and channels are made (see the module docstring).

    ``tokens`` None serves and calls without a token: only for a run from before tokens started
    with ``--allow-unauthenticated``, for the raw-wire baselines of `tether bench`, and for
    tests of the transport itself (:meth:`insecure`)."""

    tokens: TokenBook | None
    tls: TlsFiles = TlsFiles()

    @classmethod
    def insecure(cls) -> Security:
        return cls(None)

    def describe(self) -> str:
        """What protects this process's calls, for its start-up line (never the token)."""
        auth = "run token" if self.tokens is not None else "NO authentication"
        tls = "mutual TLS" if self.tls.mutual else "TLS" if self.tls.enabled else "plaintext"
        return f"{auth}, {tls}"

    def server(
        self, address: str, *, max_workers: int, name: str, options: Options = ()
    ) -> tuple[grpc.Server, int]:
        """A server bound (not started) to ``address`` (port 0 picks one); returns it and the
        port. OSError when it cannot listen."""
        interceptors = [] if self.tokens is None else [RunTokenInterceptor(self.tokens)]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name),
            interceptors=interceptors,
            options=list(options),
        )
        if self.tls.enabled:
            port = server.add_secure_port(address, _server_credentials(self.tls))
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return server, port

    def channel(self, address: str, *, options: Options = ()) -> grpc.Channel:
        """A channel to ``address`` that carries the token and speaks TLS as configured."""
        if self.tls.enabled:
            named = [("grpc.ssl_target_name_override", self.tls.server_name)]
            options = [*options, *(named if self.tls.server_name else [])]
            channel = grpc.secure_channel(address, _channel_credentials(self.tls), list(options))
        else:
            channel = grpc.insecure_channel(address, list(options))
        if self.tokens is None:
            return channel
        return _TokenChannel(channel, self.tokens)


# -- a member's security, from its run ----------------------------------------------------------


def tls_of(config: RunConfig, override: TlsFiles | None = None) -> TlsFiles:
    """The TLS files a process of the run uses: its own flags' when given, else the run's."""
    if override is not None and override.enabled:
        return override.check()
    files = TlsFiles(config.tls_cert, config.tls_key, config.tls_ca, config.tls_server_name)
    return files.check()


class _StoreTokens:
    """Reads a run's tokens through a store connection of its own, opened on first use (the
    refresh runs on its own thread)."""

    def __init__(self, store_uri: str, run_id: str) -> None:
        self.store_uri, self.run_id = store_uri, run_id
        self._store: Store | None = None
        self._lock = threading.Lock()

    def __call__(self) -> list[RunToken]:
        from tether.store import open_store

        with self._lock:
            if self._store is None:
                self._store = open_store(self.store_uri)
            return self._store.run_tokens(self.run_id)


def unauthenticated_refusal(run_id: str) -> str:
    return (
        f"run {run_id} has no token (it was created before runs had tokens): give it one with "
        f"`tether run rotate-token --run {run_id}`, or start its members with "
        "--allow-unauthenticated to serve it without authentication"
    )


def run_security(
    store: Store,
    store_uri: str,
    config: RunConfig,
    *,
    tls: TlsFiles | None = None,
    allow_unauthenticated: bool = False,
    who: str = "tether",
) -> Security:
    """The security of a process of ``config``'s run: its token from the store (re-read while
    it runs) and its TLS files (``tls`` overrides the run's). A run without a token raises
    AuthError, unless ``allow_unauthenticated``: then it is served without one, said on
    stderr at every start."""
    files = tls_of(config, tls)
    tokens = store.run_tokens(config.run_id)
    if tokens:
        return Security(TokenBook(tokens, _StoreTokens(store_uri, config.run_id)), files)
    if not allow_unauthenticated:
        raise AuthError(unauthenticated_refusal(config.run_id))
    print(
        f"{who}: WARNING: serving run {config.run_id} WITHOUT AUTHENTICATION "
        "(--allow-unauthenticated): anyone who can reach its ports can read and change the model",
        file=sys.stderr,
        flush=True,
    )
    return Security(None, files)
