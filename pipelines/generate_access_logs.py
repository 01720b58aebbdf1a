"""Make realistic Apache/Nginx access logs (combined format) for the examples and the
benchmark: many visitors (IPv4 and IPv6) browsing sessions of pages and assets, a mix of
statuses, browsers and bots, a few malformed lines, and rotated files like logrotate's.

    python pipelines/generate_access_logs.py                 # the bundled sample in pipelines/logs/
    python pipelines/generate_access_logs.py --lines 1000000 --out /tmp/logs --rotate 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import random
from pathlib import Path

PAGES = ["/", "/products", "/products/{id}", "/cart", "/checkout", "/search?q={word}",
         "/blog/{slug}", "/about", "/account/orders", "/api/v1/items/{id}", "/login"]
ASSETS = ["/static/app.{h}.js", "/static/style.{h}.css", "/img/p{id}.webp", "/favicon.ico"]
WORDS = ["shoes", "red+dress", "laptop", "coffee", "gift", "sale", "%C3%A9t%C3%A9"]
SLUGS = ["hello-world", "kafka-in-python", "parquet-tips", "release-2-0"]
BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
]
BOTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    'Mozilla/5.0 (compatible; "quoted" crawler/1.0)',
]
REFERRERS = ["-", "https://www.google.com/", "https://duckduckgo.com/", "https://news.ycombinator.com/"]
MALFORMED = [
    "this is not an access log line",
    '203.0.113.9 - - [garbage timestamp] "GET / HTTP/1.1" 200 12',
    "\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03",
]


def visitor(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.15:
        host = "2001:db8:%x::%x" % (rng.randrange(1, 0xFFFF), rng.randrange(1, 0xFFFF))
    else:
        host = "%d.%d.%d.%d" % (rng.choice([81, 93, 172, 198, 203]), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))
    bot = rng.random() < 0.1
    agent = rng.choice(BOTS if bot else BROWSERS)
    user = rng.choice(["-", "-", "-", "alice", "bob"]) if not bot else "-"
    return host, user, agent


def fill(template: str, rng: random.Random) -> str:
    return template.format(id=rng.randrange(1, 5000), word=rng.choice(WORDS), slug=rng.choice(SLUGS), h="%08x" % rng.randrange(2**32))


def lines(count: int, rng: random.Random, start: dt.datetime, malformed_every: int) -> list[str]:
    out: list[str] = []
    visitors = [visitor(rng) for _ in range(max(10, count // 20))]
    t = start
    for n in range(count):
        if malformed_every and n % malformed_every == malformed_every - 1:
            out.append(rng.choice(MALFORMED))
            continue
        t += dt.timedelta(milliseconds=rng.randrange(0, 400))
        host, user, agent = rng.choice(visitors)
        asset = rng.random() < 0.35
        path = fill(rng.choice(ASSETS if asset else PAGES), rng)
        method = "POST" if path in ("/checkout", "/login") and rng.random() < 0.5 else rng.choice(["GET"] * 12 + ["HEAD"])
        status = rng.choices([200, 304, 301, 404, 500, 403], weights=[80, 8, 3, 6, 1, 2])[0]
        size = "-" if status in (304, 301) or method == "HEAD" else str(rng.randrange(200, 250_000))
        request = f"{method} {path} HTTP/{rng.choice(['1.1', '1.1', '2.0'])}"
        if rng.random() < 0.002:
            request = "-"  # a client that sent nothing (Apache logs "-")
        stamp = t.strftime("%d/%b/%Y:%H:%M:%S +0000")
        referrer = rng.choice(REFERRERS)
        out.append(f'{host} - {user} [{stamp}] "{request}" {status} {size} "{referrer}" "{agent.replace(chr(34), chr(92) + chr(34))}"')
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--lines", type=int, default=6000, help="lines in all")
    parser.add_argument("--out", type=Path, default=here / "logs", help="output directory")
    parser.add_argument("--rotate", type=int, default=2, help="rotated files (the oldest gzipped)")
    parser.add_argument("--malformed-every", type=int, default=1000, help="one malformed line per N (0: none)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    files = args.rotate + 1
    per_file = args.lines // files
    start = dt.datetime(2026, 11, 20, 6, 0, tzinfo=dt.timezone.utc)
    # Oldest first: access.log.N(.gz) ... access.log.1, access.log (logrotate's naming).
    for i in range(files - 1, -1, -1):
        count = per_file if i else args.lines - per_file * (files - 1)
        text = "\n".join(lines(count, rng, start, args.malformed_every)) + "\n"
        start += dt.timedelta(hours=3)
        name = "access.log" + (f".{i}" if i else "")
        if i == files - 1 and i > 0:
            with gzip.open(args.out / (name + ".gz"), "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (args.out / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
