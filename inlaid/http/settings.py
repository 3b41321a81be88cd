"""The HTTP front's settings: the `[http]` section of the server config. Imports nothing
heavier than the standard library, so the server config and the front can both use it."""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def check_listen_address(section: str, host: str, port: int, allow_public_bind: bool) -> None:
    """Raise ValueError unless `host:port` is a usable listening address; hosts beyond
    this machine need `server.allow_public_bind` (the endpoints carry no credentials)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{section}.port must be an integer in 1-65535, got {port!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"{section}.host must be a non-empty string")
    if host not in LOOPBACK_HOSTS and not allow_public_bind:
        raise ValueError(f"{section}.host {host!r} is not a loopback address; set server.allow_public_bind = true "
                         "to listen beyond this machine")


DEFAULT_MAX_PROMPTS = 16
MAX_TIMEOUT_S = 1e6  # as the server's timers (serve/config.py MAX_SECONDS)


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # One generate through the SDK (for a stream: the wait for each next piece).
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    # Seconds a client may take to send a request's head, and again its body: then 408 (a
    # connection that never finishes its request would otherwise hold a descriptor for ever).
    client_send_timeout_s: float = 30.0
    # Prompts one /v1/completions request may list (each runs as a request of its own and
    # takes one of server.max_pending_requests); more: 400. None: DEFAULT_MAX_PROMPTS, and
    # under `inlaid serve` at most server.max_pending_requests.
    max_prompts_per_request: int | None = None

    @property
    def prompts_per_request_limit(self) -> int:
        return DEFAULT_MAX_PROMPTS if self.max_prompts_per_request is None else self.max_prompts_per_request

    def validate(self, allow_public_bind: bool) -> None:
        check_listen_address("http", self.host, self.port, allow_public_bind)
        for name in ("request_timeout_s", "client_send_timeout_s"):
            # finite and bounded as the server's own timers: inf is no timeout (slow clients
            # would hold their connections for ever), and asyncio's timers overflow on it
            timeout = getattr(self, name)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
                raise ValueError(f"http.{name} must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, "
                                 f"got {timeout!r}")
        size = self.max_body_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 1024:
            raise ValueError(f"http.max_body_bytes must be an integer >= 1024, got {size!r}")
        prompts = self.max_prompts_per_request
        if prompts is not None and (isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1):
            raise ValueError(f"http.max_prompts_per_request must be an integer >= 1, got {prompts!r}")
