"""The PostgreSQL connection pool (peewee-async over psycopg 3) and its health tracking.

Requests that need the database while it is unreachable must answer 503 at once rather than
wait on the pool, so a connection failure marks the database down and a background probe marks
it up again; the pool's broken idle connections are then checked out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import peewee
import psycopg
import psycopg_pool
from peewee_async import Psycopg3Database
from peewee_async.databases import FetchResults
from peewee_async.pool import PsycopgPoolBackend
from peewee_async.utils import ConnectionProtocol

from storage.errors import ServiceUnavailable

log = logging.getLogger("satchel.db")

# SQLSTATEs of a server that is going away or not accepting connections yet.
_SERVER_GONE = ("57P01", "57P02", "57P03")
# How long a request may wait for a pooled connection before the pool counts as exhausted.
POOL_TIMEOUT = 5.0
# A down database is probed this often; recovery is noticed within this time plus a connect.
PROBE_INTERVAL = 0.5
CONNECT_TIMEOUT = 3
# The look at start-up is short: a database that does not answer within it is probed later.
START_PROBE_TIMEOUT = 1.0


def _keepalive_params(idle: int = 10) -> dict[str, Any]:
    # A vanished peer is noticed within idle + 9 s instead of the kernel's two hours.
    return {
        "connect_timeout": CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": 3,
        "keepalives_count": 3,
    }


async def dedicated_connection(
    url: str, *, name: str, keepalive_idle: int = 10
) -> psycopg.AsyncConnection[Any]:
    """A connection outside the pool (LISTEN, run locks), named in pg_stat_activity."""
    return await psycopg.AsyncConnection.connect(
        url, autocommit=True, application_name=name, **_keepalive_params(keepalive_idle)
    )


class _DsnPoolBackend(PsycopgPoolBackend):
    """peewee-async's psycopg pool, built from a connection URL instead of split parameters."""

    async def create(self) -> None:
        params = dict(self.connect_params)
        conninfo = params.pop("conninfo")
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            conninfo,
            kwargs={
                "cursor_factory": psycopg.AsyncClientCursor,
                "autocommit": True,
                **_keepalive_params(),
            },
            open=False,
            **params,
        )
        await pool.open(wait=False)
        self.pool = pool


class Database(Psycopg3Database):  # type: ignore[misc]
    """peewee-async database bound to one URL, counting statements and tracking reachability."""

    pool_backend_cls = _DsnPoolBackend

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 20) -> None:
        self.url = url
        self.statements = 0
        self.available = False
        self._probe: asyncio.Task[None] | None = None
        pool_params = {
            "conninfo": url,
            "min_size": min_size,
            "max_size": max_size,
            "timeout": POOL_TIMEOUT,
            "name": "satchel",
        }
        super().__init__("satchel", pool_params=pool_params)

    async def start(self) -> None:
        """Open the pool; one quick look at the database, then watch it in the background.

        The quick look lets the first requests after start-up succeed when the database is
        there; a refused connection fails at once, so a missing database costs no delay.
        """
        await self.aio_connect()
        if await self._reachable(limit=START_PROBE_TIMEOUT):
            self.available = True
        else:
            self.mark_down()

    async def stop(self) -> None:
        """Stop probing and close the pool."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        await self.aio_close()

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        """The underlying psycopg pool."""
        return cast("psycopg_pool.AsyncConnectionPool[Any]", self.pool_backend.pool)

    def require(self) -> None:
        """Raise 503 at once while the database is known to be unreachable."""
        if not self.available:
            raise ServiceUnavailable("The database is unreachable; try again shortly.")

    def mark_down(self) -> None:
        """Record that the database cannot be reached and start probing for its return."""
        if self.available:
            log.warning("database unreachable", extra={"event": "db_down"})
        self.available = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _reachable(self, limit: float) -> bool:
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(self.url, **_keepalive_params()), limit
            )
        except (psycopg.Error, OSError, TimeoutError):
            return False
        await conn.close()
        return True

    async def _probe_until_up(self) -> None:
        while True:
            started = time.monotonic()
            if not await self._reachable(limit=CONNECT_TIMEOUT):
                await asyncio.sleep(max(0.0, PROBE_INTERVAL - (time.monotonic() - started)))
                continue
            await self.pool.check()
            self.available = True
            log.info("database reachable", extra={"event": "db_up"})
            return

    async def aio_execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        fetch_results: FetchResults | None = None,
    ) -> Any:
        """Run one statement, turning a lost database into 503 and noting it."""
        self.require()
        self.statements += 1
        try:
            return await super().aio_execute_sql(sql, params, fetch_results=fetch_results)
        except Exception as exc:
            self._raise_if_unreachable(exc)
            raise

    def _raise_if_unreachable(self, exc: BaseException) -> None:
        if is_connection_error(exc):
            self.mark_down()
            raise ServiceUnavailable("The database is unreachable; try again shortly.") from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A transaction on one pooled connection; a lost database becomes 503."""
        self.require()
        try:
            async with self.aio_transaction():
                yield
        except Exception as exc:
            self._raise_if_unreachable(exc)
            raise

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement."""
        return cast(list[tuple[Any, ...]], await self.aio_execute_sql(sql, params, _fetchall))

    async def fetch_prepared(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a hot read, as a prepared statement with server-side parameters.

        Each pooled connection plans the statement once instead of on every request; callers
        keep the text stable (no literals that vary per request) so the plan is reused.
        """
        self.require()
        self.statements += 1
        try:
            async with self.aio_connection() as conn:
                cursor = psycopg.AsyncCursor(conn)
                await cursor.execute(sql, params, prepare=True)
                return await cursor.fetchall()
        except Exception as exc:
            self._raise_if_unreachable(exc)
            raise

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of one statement, or None."""
        return cast("tuple[Any, ...] | None", await self.aio_execute_sql(sql, params, _fetchone))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement and return the number of rows it touched."""
        return cast(int, await self.aio_execute_sql(sql, params, _rowcount))


async def _fetchall(_db: Any, cursor: Any) -> list[tuple[Any, ...]]:
    return cast(list[tuple[Any, ...]], await cursor.fetchall())


async def _fetchone(_db: Any, cursor: Any) -> tuple[Any, ...] | None:
    return cast("tuple[Any, ...] | None", await cursor.fetchone())


async def _rowcount(_db: Any, cursor: Any) -> int:
    return cast(int, cursor.rowcount)


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the database cannot be reached, as opposed to a bad statement."""
    if isinstance(exc, ServiceUnavailable | psycopg_pool.PoolTimeout | psycopg_pool.PoolClosed):
        return True
    if isinstance(exc, peewee.PeeweeException):
        # peewee wraps the driver's error and keeps it as `orig` (not in `args`).
        exc = getattr(exc, "orig", None) or exc
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in _SERVER_GONE
    return False


__all__ = ["ConnectionProtocol", "Database", "is_connection_error"]
