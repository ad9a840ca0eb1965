"""The baseline: a bare Tornado JSON handler, one process, no database, no middleware.

`python -m bench.hello` listens on HOST:PORT (127.0.0.1:8001 by default) and answers every GET
of `/` with `{"hello": "world"}` as application/json, the way the Tornado docs write it.
"""

from __future__ import annotations

import asyncio
import os
import signal

import tornado.web


class HelloHandler(tornado.web.RequestHandler):
    """`GET /`: a constant JSON object."""

    def get(self) -> None:
        """Tornado serialises the dict and sets Content-Type: application/json."""
        self.write({"hello": "world"})


async def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    app = tornado.web.Application([(r"/", HelloHandler)])
    app.listen(int(os.environ.get("PORT", "8001")), os.environ.get("HOST", "127.0.0.1"))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()


if __name__ == "__main__":
    asyncio.run(main())
