"""The object store: one aiobotocore S3 client per process, and links to stored archives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("satchel.s3")
# A health check must answer quickly even when S3 hangs.
PING_TIMEOUT = 3.0


class ObjectStore:
    """The archive bucket: an async client for transfers, a local signer for links."""

    def __init__(
        self,
        *,
        bucket: str,
        region: str,
        endpoint_url: str | None,
        link_ttl: int,
        public_base_url: str | None,
    ) -> None:
        self.bucket = bucket
        self.link_ttl = link_ttl
        self.public_base_url = public_base_url
        self.client: Any = None
        options = {"region_name": region, "endpoint_url": endpoint_url}
        # Presigning is local computation; a plain botocore client does it without the loop.
        self._signer = botocore.session.get_session().create_client(
            "s3", config=Config(signature_version="s3v4"), **options
        )
        self._options = options

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ObjectStore]:
        """Open the async client for the lifetime of the block."""
        config = AioConfig(
            signature_version="s3v4",
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=50,
            # Over https botocore already sends part bodies unsigned, as they carry a CRC-32
            # (storage/multipart.py) and TLS guards them; over http it would SHA-256 every part
            # on the event loop, a quarter of the uploader's CPU. The checksum header is signed.
            s3={"payload_signing_enabled": False},
        )
        async with get_session().create_client("s3", config=config, **self._options) as client:
            self.client = client
            try:
                yield self
            finally:
                self.client = None

    def link(self, key: str) -> str:
        """A download link for a stored archive: public base URL, or presigned afresh."""
        if self.public_base_url:
            return f"{self.public_base_url.rstrip('/')}/{quote(key)}"
        url: str = self._signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.link_ttl,
        )
        return url

    async def ping(self) -> bool:
        """Whether the bucket answers."""
        try:
            await asyncio.wait_for(self.client.head_bucket(Bucket=self.bucket), PING_TIMEOUT)
        except (TimeoutError, BotoCoreError, ClientError, OSError) as exc:
            log.warning("S3 not ready: %s", exc)
            return False
        return True
