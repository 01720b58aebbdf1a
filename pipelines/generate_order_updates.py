"""Make a stream of order status updates (JSON lines) for pipelines/sqlite-upsert.yaml:
orders created, paid, shipped, delivered, some cancelled or refunded, each change one line,
the lines in time order so the updates of many orders interleave.

    python pipelines/generate_order_updates.py                     # pipelines/data/order-updates.jsonl
    python pipelines/generate_order_updates.py --orders 100000 --out /tmp/updates.jsonl
    python pipelines/generate_order_updates.py --first 201 --orders 50 --start 2026-11-21T08:00:00 --out more.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

CUSTOMERS = ["margaret", "dennis", "grace", "linus", "ada", "ken", "barbara", "edsger", "frances", "guido"]
# status -> the statuses it may move to, with weights; an empty list ends the order.
NEXT = {
    "created": [("paid", 85), ("cancelled", 15)],
    "paid": [("shipped", 90), ("cancelled", 10)],
    "shipped": [("delivered", 100)],
    "delivered": [("refunded", 5), (None, 95)],
    "cancelled": [],
    "refunded": [],
}


def updates(first: int, orders: int, start: dt.datetime, rng: random.Random) -> list[dict]:
    out = []
    for order_id in range(first, first + orders):
        t = start + dt.timedelta(seconds=rng.randrange(0, 6 * 3600))
        amount = round(rng.uniform(5, 500), 2)
        customer = rng.choice(CUSTOMERS)
        status: str | None = "created"
        version = 0
        while status is not None:
            version += 1
            out.append({
                "order_id": order_id,
                "status": status,
                "version": version,
                "customer": customer,
                "amount": amount,
                "updated_at": int(t.timestamp() * 1000),
            })
            choices = NEXT[status]
            if not choices:
                break
            status = rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]
            t += dt.timedelta(seconds=rng.randrange(60, 4 * 3600), milliseconds=rng.randrange(1000))
    out.sort(key=lambda u: (u["updated_at"], u["order_id"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--orders", type=int, default=200, help="how many orders")
    parser.add_argument("--first", type=int, default=1, help="the first order id")
    parser.add_argument("--start", default="2026-11-20T08:00:00", help="when the first orders are created (UTC)")
    parser.add_argument("--out", type=Path, default=here / "data" / "order-updates.jsonl")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = dt.datetime.fromisoformat(args.start).replace(tzinfo=dt.timezone.utc)
    lines = [json.dumps(u) for u in updates(args.first, args.orders, start, rng)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
