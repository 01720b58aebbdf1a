"""Benchmark record transforms: the cost per record of each built-in transform, and of the
chain of pipelines/activity-routed.yaml, on access-log records as the http_log source
makes them (plus `useragent` when the pipeline-useragent plugin is installed).

    python bench/transforms.py [--records 200000] [--batch 10000]

Transforms run per batch in the engine's process, so their cost adds to the run's
per-record time (about 30 µs end to end for the activity job, see README).
"""

from __future__ import annotations

import argparse
import datetime
import random
import time
from typing import Any

from runner.batch import Batch
from runner.plugins import load_plugins
from runner.transform import TransformContext

PATHS = ["/", "/products/42", "/cart", "/static/app.js", "/img/logo.png", "/search?q=x", "/favicon.ico"]
AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.4.0",
]

# One entry per measurement: (label, [(transform, config), ...]).
CASES: list[tuple[str, list[tuple[str, dict]]]] = [
    ("rename", [("rename", {"fields": {"remote_host": "client_ip"}})]),
    ("drop", [("drop", {"fields": ["ident", "user"]})]),
    ("mask (replace)", [("mask", {"fields": ["remote_host"]})]),
    ("mask (hash)", [("mask", {"fields": ["remote_host"], "hash": True, "salt": "s"})]),
    ("cast", [("cast", {"fields": {"status": "string"}})]),
    ("insert", [("insert", {"fields": {"region": "eu"}})]),
    ("timestamp", [("timestamp", {"field": "timestamp", "to": "string"})]),
    ("filter", [("filter", {"drop": "status >= 500 or path.startswith('/static/')"})]),
    ("route", [("route", {"field": "method", "topics": {"POST": "writes"}})]),
    ("activity-routed chain", [
        ("rename", {"fields": {"remote_host": "client_ip"}}),
        ("mask", {"fields": ["client_ip"], "hash": True, "salt": "s"}),
        ("filter", {"drop": "path.startswith(('/static/', '/img/')) or path == '/favicon.ico' "
                            "or 'bot' in user_agent.lower()"}),
        ("cast", {"fields": {"status": "string"}}),
        ("drop", {"fields": ["ident"]}),
        ("route", {"field": "method", "topics": {"POST": "writes"}}),
    ]),
    ("useragent", [("useragent", {})]),
]


def records(n: int) -> list[dict[str, Any]]:
    rnd = random.Random(7)
    start = datetime.datetime(2026, 11, 20, tzinfo=datetime.timezone.utc)
    out = []
    for i in range(n):
        path = rnd.choice(PATHS)
        method = "POST" if rnd.random() < 0.1 else "GET"
        out.append({
            "remote_host": f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}", "ident": None, "user": None,
            "timestamp": start + datetime.timedelta(seconds=i), "request": f"{method} {path} HTTP/1.1",
            "method": method, "path": path, "protocol": "HTTP/1.1", "status": rnd.choice([200, 200, 304, 404, 500]),
            "bytes": rnd.randrange(100_000), "referer": None, "user_agent": rnd.choice(AGENTS),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000)
    args = parser.parse_args()
    host = load_plugins()
    rows = records(args.records)
    print(f"{args.records:,} records in batches of {args.batch:,}\n")
    print(f"{'transform':<24} {'µs/record':>10} {'records/s':>12}")
    for label, chain in CASES:
        try:
            transforms = [
                host.lookup("transform", name).cls(
                    host.lookup("transform", name).cls.Config.parse(config),
                    TransformContext("bench", "source", f"transforms[{i}]"),
                )
                for i, (name, config) in enumerate(chain)
            ]
        except LookupError:
            print(f"{label:<24} {'(not installed)':>10}")
            continue
        begin = time.perf_counter()
        for at in range(0, len(rows), args.batch):
            batch = Batch([dict(r) for r in rows[at:at + args.batch]])
            for transform in transforms:
                batch = transform.apply(batch)
        elapsed = time.perf_counter() - begin
        print(f"{label:<24} {elapsed / len(rows) * 1e6:>10.2f} {len(rows) / elapsed:>12,.0f}")
    print("\n(the times include copying each input record once, as a fresh batch would be)")


if __name__ == "__main__":
    main()
