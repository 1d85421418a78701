#!/usr/bin/env python3
"""Demo feed for the live dashboard: plausible orders, metrics and log lines.

Publishes native-format envelopes (``{"event", "data", "retain"}``) with
``PUBLISH <prefix><channel>``, exactly as an app would:

- ``orders``: ``order.created`` then later ``order.paid`` / ``order.shipped`` /
  ``order.cancelled`` for the same order id;
- ``metrics``: ``metric`` events, retained per metric (``retain: "metric:<name>"``), so
  a dashboard opened later, or one that got ``broker.reset``, shows every tile at once;
- ``log``: ``log`` lines with a level.

Runs for ``--seconds`` (default 60) and stops. Redis URL and prefix default to the
broker's own variables (``SSE_BROKER_REDIS_URL``, ``SSE_BROKER_INGEST_PREFIX``), so
one environment serves both::

    python examples/dashboard/publisher.py --seconds 120 --rate 3

Needs only redis-py (``pip install redis``), which the broker already depends on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import redis

CUSTOMERS = [
    "Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson", "Linus Torvalds",
    "Margaret Hamilton", "Dennis Ritchie", "Barbara Liskov", "Ken Thompson", "Frances Allen",
    "Edsger Dijkstra", "Radia Perlman", "Donald Knuth", "Hedy Lamarr", "John McCarthy",
]  # fmt: skip
CARRIERS = ["DHL", "UPS", "La Poste", "DPD", "GLS"]
LOG_LINES = [
    ("info", "cache warmed: 1,204 product pages"),
    ("info", "nightly report queued for the finance team"),
    ("info", "payment webhook processed in 84 ms"),
    ("warn", "slow query on orders_search (812 ms)"),
    ("info", "deployed web@{build} to 3 of 3 hosts"),
    ("warn", "retrying mail delivery to a full mailbox"),
    ("error", "payment provider timeout, order #{order} will be retried"),
    ("info", "inventory sync finished: {n} SKUs updated"),
]
METRICS = {
    # name: (label, unit, start, step, low, high)
    "active_users": ("Active users", "", 240, 12, 120, 600),
    "orders_per_min": ("Orders / min", "", 18, 3, 4, 60),
    "revenue_today": ("Revenue today", "EUR", 12840, 0, 0, 10**9),
    "p95_latency": ("p95 latency", "ms", 182, 14, 90, 420),
}


@dataclass
class Feed:
    """The demo's state: pending orders and current metric values."""

    rng: random.Random
    next_order: int = 1041
    pending: dict[int, str] = field(default_factory=dict)  # order id -> status
    values: dict[str, float] = field(default_factory=dict)  # current metric values
    shown: dict[str, float] = field(default_factory=dict)  # last published metric values

    def new_order(self) -> tuple[str, dict[str, Any]]:
        self.next_order += 1
        order_id = self.next_order
        items = self.rng.randint(1, 6)
        total = round(items * self.rng.uniform(9.5, 79.0), 2)
        self.pending[order_id] = "created"
        revenue = self.values.get("revenue_today", METRICS["revenue_today"][2])
        self.values["revenue_today"] = round(revenue + total, 2)
        return "order.created", {
            "id": order_id,
            "customer": self.rng.choice(CUSTOMERS),
            "items": items,
            "total": total,
            "currency": "EUR",
            "status": "created",
        }

    def advance_order(self) -> tuple[str, dict[str, Any]] | None:
        if not self.pending:
            return None
        order_id = self.rng.choice(sorted(self.pending))
        status = self.pending[order_id]
        if status == "created":
            new = "cancelled" if self.rng.random() < 0.1 else "paid"
        else:
            new = "shipped"
        if new in ("shipped", "cancelled"):
            del self.pending[order_id]
        else:
            self.pending[order_id] = new
        data: dict[str, Any] = {"id": order_id, "status": new}
        if new == "shipped":
            data["carrier"] = self.rng.choice(CARRIERS)
        return f"order.{new}", data

    def metric(self, name: str) -> dict[str, Any]:
        label, unit, start, step, low, high = METRICS[name]
        value = self.values.get(name, start)
        if step:  # a random walk; revenue only grows with the orders
            value = min(high, max(low, value + self.rng.randint(-step, step)))
        self.values[name] = value
        previous = self.shown.get(name, value)
        self.shown[name] = value
        return {
            "name": name,
            "label": label,
            "value": value,
            "unit": unit,
            "delta": round(value - previous, 2),
        }

    def log_line(self) -> dict[str, Any]:
        level, text = self.rng.choice(LOG_LINES)
        message = text.format(
            build=self.rng.randint(4100, 4999),
            order=self.next_order,
            n=self.rng.randint(20, 900),
        )
        return {"level": level, "message": message}


class Publisher:
    def __init__(self, client: redis.Redis, prefix: str, channels: dict[str, str]) -> None:
        self.client = client
        self.prefix = prefix
        self.channels = channels
        self.count = 0

    def send(self, kind: str, event: str, data: Any, retain: str | None = None) -> None:
        envelope: dict[str, Any] = {"event": event, "data": data}
        if retain is not None:
            envelope["retain"] = retain
        self.client.publish(self.prefix + self.channels[kind], json.dumps(envelope))
        self.count += 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url",
        default=env.get("SSE_BROKER_REDIS_URL")
        or env.get("REDIS_URL")
        or "redis://127.0.0.1:6379/0",
        help="Redis to publish to (default: $SSE_BROKER_REDIS_URL, $REDIS_URL, local Redis)",
    )
    parser.add_argument(
        "--prefix",
        default=env.get("SSE_BROKER_INGEST_PREFIX", "sse:"),
        help="the broker's ingest.prefix (default: $SSE_BROKER_INGEST_PREFIX or 'sse:')",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    parser.add_argument("--rate", type=float, default=2.0, help="events per second")
    parser.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    parser.add_argument("--orders-channel", default="orders")
    parser.add_argument("--metrics-channel", default="metrics")
    parser.add_argument("--log-channel", default="log")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds < 0:
        parser.error("--rate must be > 0 and --seconds >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(args.redis_url)
    pub = Publisher(
        client,
        args.prefix,
        {"orders": args.orders_channel, "metrics": args.metrics_channel, "log": args.log_channel},
    )
    feed = Feed(random.Random(args.seed))
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    started = time.monotonic()
    deadline = started + args.seconds
    # Current state first: every tile, and a couple of orders in flight.
    for name in METRICS:
        pub.send("metrics", "metric", feed.metric(name), retain=f"metric:{name}")
    pub.send("log", "log", {"level": "info", "message": "demo publisher started"})
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    while not stop and time.monotonic() < deadline:
        roll = feed.rng.random()
        if roll < 0.35:
            pub.send("orders", *feed.new_order())
        elif roll < 0.6 and (step := feed.advance_order()) is not None:
            pub.send("orders", *step)
        elif roll < 0.85:
            name = feed.rng.choice(list(METRICS))
            pub.send("metrics", "metric", feed.metric(name), retain=f"metric:{name}")
            if name != "revenue_today":  # keep revenue in step with the orders
                pub.send(
                    "metrics", "metric", feed.metric("revenue_today"), retain="metric:revenue_today"
                )
        else:
            pub.send("log", "log", feed.log_line())
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    elapsed = time.monotonic() - started
    print(f"published {pub.count} events in {elapsed:.1f}s to {args.prefix}*", file=sys.stderr)
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except redis.RedisError as exc:
        print(f"publisher: Redis error: {exc} (is Redis at {args.redis_url}?)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
