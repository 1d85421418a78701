"""Who a connection is and which channels it may subscribe.

An ``Authenticator`` turns a request's :class:`Credentials` into an
:class:`Identity` (or raises Unauthorized / Forbidden / Retryable);
:func:`authorize` then checks every requested channel against the
identity's grants and the public channels. Auth never touches the hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from broker.auth.grants import NO_GRANTS, Grants, public_allows
from broker.errors import Forbidden, Unauthorized


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a stream request carries that auth may look at (never logged)."""

    token: str | None = field(default=None, repr=False)  # Bearer, else ?token=, else cookie
    authorization: str | None = field(default=None, repr=False)
    cookie_header: str | None = field(default=None, repr=False)
    cookies: dict[str, str] = field(default_factory=dict, repr=False)
    client_ip: str = ""
    host: str = ""
    forwarded_for: str | None = None
    forwarded_host: str | None = None
    socket_id: str | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """A connection's identity: ``grants`` are already expanded for user and tenant."""

    user: str | None = None
    tenant: str | None = None
    grants: Grants = NO_GRANTS
    expires_at: float | None = None  # epoch seconds (JWT exp): the stream ends then
    key: str | None = None  # JWT: fingerprint of the key that verified the token


ANONYMOUS = Identity()


class Authenticator(Protocol):
    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity: ...

    def verifies(self, key: str) -> bool:
        """Whether the key with this fingerprint (``Identity.key``) is still configured."""
        ...

    async def close(self) -> None: ...


def authorize(
    identity: Identity, public: Grants, channels: tuple[str, ...], *, anonymous_may_log_in: bool
) -> None:
    """Raise for the first requested channel this identity may not subscribe.

    An anonymous request for a non-public channel is 401 when credentials
    would help (any mode but ``none``); otherwise 403 naming the channel.
    """
    for channel in channels:
        if identity.grants.allows(channel) or public_allows(public, channel):
            continue
        if identity is ANONYMOUS and anonymous_may_log_in:
            raise Unauthorized(
                f"channel {channel!r} requires credentials", code="credentials_required"
            )
        raise Forbidden(f"channel {channel!r} is not granted", code="channel_forbidden")


class NoAuth:
    """``auth.mode = "none"``: no credentials are read; only public channels."""

    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity:
        return ANONYMOUS

    def verifies(self, key: str) -> bool:
        return False

    async def close(self) -> None:
        return None
