"""An aiohttp application served from an event loop of its own, on a thread, so that tests
written as plain synchronous code can run a real HTTP server next to them (the fake
Kubernetes API, the OTLP/HTTP receiver). The server can go down and come back on the same
port; coroutines are run on its loop with `call`."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"


class BackgroundApp:
    def __init__(self, name: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        """Run coro on the app's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def serve(self, app: web.Application, **runner_kw: Any) -> None:
        """On the app's loop: listen on the port (again). An error leaves nothing running."""
        runner = web.AppRunner(app, access_log=None, **runner_kw)
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port, reuse_address=True, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner

    async def unserve(self) -> None:
        """On the app's loop: close the port and every connection."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def close(self) -> None:
        self.call(self.unserve())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
