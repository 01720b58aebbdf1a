"""A TCP proxy for tests that need a server to go away and come back.

    proxy = TcpProxy("127.0.0.1", broker_port)   # listens on 127.0.0.1:proxy.port
    proxy.cut()       # every open connection closed both ways; new connects refused
    proxy.restore()   # listening again, on the same port
    proxy.close()     # everything stopped (always call it: try/finally or a fixture)

It runs its own asyncio loop in a daemon thread, so a test (synchronous, or with a loop
of its own) drives it with plain calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0  # chosen by the first listen, kept by every restore
        self.connections = 0  # accepted so far (tests may check traffic went through here)
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self.restore()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro, timeout: float = 10) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def restore(self) -> None:
        """Listen (again) on 127.0.0.1:port."""
        self._call(self._listen())

    def cut(self) -> None:
        """Stop listening (connects are refused) and close every open connection."""
        self._call(self._cut())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._cut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket: connects are refused from now on
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(client_w)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            self._open.discard(client_w)
            client_w.transport.abort()
            return
        if client_w not in self._open:  # cut while connecting upstream
            upstream_w.transport.abort()
            return
        self._open.add(upstream_w)
        await asyncio.gather(self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w))
        for w in (client_w, upstream_w):
            self._open.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until it ends; then end the other side's writing too."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
