"""The HTTP front's settings: the `[http]` section of the server config. Imports nothing
heavier than the protocol's constants (msgspec), so the server config and the front can
both use it."""

from __future__ import annotations

from dataclasses import dataclass

from inlaid.cli_args import MAX_SECONDS
from inlaid.protocol.client import DEFAULT_MAX_FRAME_BYTES

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def check_listen_address(section: str, host: str, port: int, allow_public_bind: bool,
                         how_to_allow: str = "set server.allow_public_bind = true", key_joint: str = ".") -> None:
    """Raise ValueError unless `host:port` is a usable listening address; hosts beyond
    this machine need `server.allow_public_bind` (the endpoints carry no credentials), which
    the refusal tells how to set (`how_to_allow`: a command line says its switch). The keys
    are named `{section}{key_joint}port` and `...host` ("http.port"; "ray.http_port")."""
    port_key, host_key = f"{section}{key_joint}port", f"{section}{key_joint}host"
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{port_key} must be an integer in 1-65535, got {port!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"{host_key} must be a non-empty string")
    if host not in LOOPBACK_HOSTS and not allow_public_bind:
        raise ValueError(f"{host_key} {host!r} is not a loopback address; {how_to_allow} to listen beyond this "
                         "machine")


DEFAULT_MAX_PROMPTS = 16


def front_admission_share(max_pending_requests: int) -> int:
    """The requests one connection (the front is one, to the server) is always admitted on
    an otherwise idle server: the coordinator keeps the last tenth of
    server.max_pending_requests (at least one) from a connection holding its share
    (`serve/in_flight.py`, `_overloaded`); a lone request is always admitted."""
    return max(1, max_pending_requests - max(1, max_pending_requests // 10))


MAX_TIMEOUT_S = MAX_SECONDS  # as the server's timers
# What a request's message to the server (one ZeroMQ frame, msgpack) may carry beyond the
# bytes of the HTTP body it came from: the request id, the message's field names, the
# sampling values the front fills in (at most ~400 bytes measured). Everything else in a
# frame comes from the body and is no larger in msgpack than in JSON, so a body within
# `max_frame_bytes - FRAME_HEADROOM_BYTES` always fits the server's frame limit.
FRAME_HEADROOM_BYTES = 1024
DEFAULT_MAX_BODY_BYTES = DEFAULT_MAX_FRAME_BYTES - FRAME_HEADROOM_BYTES
MIN_BODY_BYTES = 1024


def max_body_bytes_for(max_frame_bytes: int) -> int:
    """The largest body whose requests a server with `server.max_frame_bytes` always accepts."""
    return max_frame_bytes - FRAME_HEADROOM_BYTES


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # One generate through the SDK (for a stream: the wait for each next piece).
    request_timeout_s: float = 600.0
    # Larger request bodies: 413. None: DEFAULT_MAX_BODY_BYTES, and under `inlaid serve` at
    # most what server.max_frame_bytes carries (`fit_to_frames`).
    max_body_bytes: int | None = None
    # Seconds a client may take to send a request's head, and again its body: then 408 (a
    # connection that never finishes its request would otherwise hold a descriptor for ever).
    client_send_timeout_s: float = 30.0
    # Prompts one /v1/completions request may list (each runs as a request of its own and
    # takes one of server.max_pending_requests); more: 400. None: DEFAULT_MAX_PROMPTS, and
    # where the server's config is at hand at most the front's admission share of
    # server.max_pending_requests (`fit_to_pending_requests`).
    max_prompts_per_request: int | None = None
    # Under `inlaid serve`: a front that answers none of its supervisor's asks for this
    # long (stopped, or its event loop stuck) is killed and started again (`process.py`).
    front_liveness_s: float = 60.0

    @property
    def prompts_per_request_limit(self) -> int:
        return DEFAULT_MAX_PROMPTS if self.max_prompts_per_request is None else self.max_prompts_per_request

    @property
    def body_bytes_limit(self) -> int:
        return DEFAULT_MAX_BODY_BYTES if self.max_body_bytes is None else self.max_body_bytes

    def fit_to_frames(self, max_frame_bytes: int) -> None:
        """Against the server's `server.max_frame_bytes` (known when one config holds both):
        the default body limit shrinks to what a frame carries; an explicit larger one is
        refused (ValueError): bodies between the two would pass the front and be refused
        by the server with a frame-size error the client cannot relate to its request."""
        fits = max_body_bytes_for(max_frame_bytes)
        if fits < MIN_BODY_BYTES:
            raise ValueError(f"server.max_frame_bytes ({max_frame_bytes}) leaves no room for HTTP request bodies: "
                             f"[http] needs server.max_frame_bytes >= {MIN_BODY_BYTES + FRAME_HEADROOM_BYTES}")
        if self.max_body_bytes is None:
            self.max_body_bytes = min(DEFAULT_MAX_BODY_BYTES, fits)
        elif self.max_body_bytes > fits:
            raise ValueError(f"http.max_body_bytes ({self.max_body_bytes}) exceeds what server.max_frame_bytes "
                             f"({max_frame_bytes}) carries: a request's message to the server is up to "
                             f"{FRAME_HEADROOM_BYTES} bytes larger than its body, so set http.max_body_bytes <= "
                             f"{fits} or raise server.max_frame_bytes")

    def fit_to_pending_requests(self, max_pending_requests: int) -> None:
        """Against the server's `server.max_pending_requests` (known when one config holds
        both): the default prompt limit shrinks to the front's admission share of it; an
        explicit larger one is refused (ValueError): a request listing more prompts than the
        server admits from one connection would be refused (429) however idle the server."""
        share = front_admission_share(max_pending_requests)
        if self.max_prompts_per_request is None:
            self.max_prompts_per_request = min(DEFAULT_MAX_PROMPTS, share)
        elif self.max_prompts_per_request > share:
            raise ValueError(f"http.max_prompts_per_request ({self.max_prompts_per_request}) exceeds the {share} "
                             f"requests the server admits from the front (server.max_pending_requests "
                             f"{max_pending_requests}, less the last tenth kept for other clients): such a request "
                             f"could never be admitted; set http.max_prompts_per_request <= {share} or raise "
                             "server.max_pending_requests")

    def validate(self, allow_public_bind: bool, how_to_allow: str = "set server.allow_public_bind = true") -> None:
        check_listen_address("http", self.host, self.port, allow_public_bind, how_to_allow)
        for name in ("request_timeout_s", "client_send_timeout_s", "front_liveness_s"):
            # finite and bounded as the server's own timers: inf is no timeout (slow clients
            # would hold their connections for ever), and asyncio's timers overflow on it
            timeout = getattr(self, name)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
                raise ValueError(f"http.{name} must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, "
                                 f"got {timeout!r}")
        size = self.max_body_bytes
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < MIN_BODY_BYTES):
            raise ValueError(f"http.max_body_bytes must be an integer >= {MIN_BODY_BYTES}, got {size!r}")
        prompts = self.max_prompts_per_request
        if prompts is not None and (isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1):
            raise ValueError(f"http.max_prompts_per_request must be an integer >= 1, got {prompts!r}")
