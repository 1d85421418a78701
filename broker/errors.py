"""One error root for the whole broker.

Every error carries a machine-readable ``code`` and the HTTP ``status`` it maps
to, so the HTTP layer turns any of them into a JSON body without guessing.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class ConfigError(BrokerError):
    """A config key is unknown, has the wrong type or is out of range.

    The message always names the key (dotted path) and, when known, the source
    (file path, environment variable or ``--set``).
    """

    code = "config"


class BadRequest(BrokerError):
    """The client's request can never succeed as sent (retrying repeats it)."""

    status = 400
    code = "bad_request"


class Unauthorized(BrokerError):
    status = 401
    code = "unauthorized"


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"


class Retryable(BrokerError):
    """A refusal the client should retry later (limits, not ready, draining).

    ``reason`` is the ``broker.reconnect`` reason sent to EventSource clients,
    which get a 200 with a control event instead of the plain status.
    """

    def __init__(self, message: str, *, code: str, status: int, reason: str, retry_after: int = 1):
        super().__init__(message, code=code, status=status)
        self.reason = reason
        self.retry_after = retry_after


class Rejected(BrokerError):
    """An inbound message that is not delivered; ``code`` is the metric reason label."""

    status = 400
    code = "invalid"
