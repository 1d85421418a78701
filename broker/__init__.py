"""sse-broker: stream events published into Redis to browsers over Server-Sent Events."""

__version__ = "0.1.0"
