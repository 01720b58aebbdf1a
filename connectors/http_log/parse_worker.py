"""A parse worker of http_log (see `parallel`): `python -m connectors.http_log.parse_worker
FORMAT` parses the chunks of lines it reads from stdin and writes their records to
stdout, in order, until stdin closes."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import sys

from connectors.http_log.formats import compile_format
from connectors.http_log.parallel import receive, send


def serve(format_text: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's: it stops us
    log_format = compile_format(format_text)
    # A chunk makes a tuple per line and drops them all; none is in a cycle. Young
    # collections every 700 of them cost about 6 % of the parse.
    gc.freeze()
    gc.set_threshold(100_000, 20, 20)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # the pipe is the protocol's: anything printed goes to stderr
    while (request := receive(stdin)) is not None:
        try:
            text, count = pickle.loads(request)
            lines = text.split("\n") if count else []
            answer = ("ok", log_format.parse_columns(lines, escapes="\\" in text, text=text))  # one scan of the chunk
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which stops the run
            answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            send(stdout, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
        except BrokenPipeError:  # the engine is gone (killed): nothing to answer, nothing to say
            os._exit(0)


if __name__ == "__main__":
    serve(sys.argv[1])
