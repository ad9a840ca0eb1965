"""MultipartUpload, abort_upload and ensure_bucket against the session's moto S3 server."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import uuid
import zlib
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from storage.multipart import (
    MIB,
    MIN_PART,
    MultipartUpload,
    UploadError,
    abort_upload,
    ensure_bucket,
    part_size_for,
)
from storage.s3 import ObjectStore

PART = 5 * MIB  # S3's smallest part keeps these tests light; production parts are >= 8 MiB


async def uploads_in(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """The bucket's incomplete multipart uploads."""
    reply = await s3.list_multipart_uploads(Bucket=bucket)
    uploads: list[dict[str, Any]] = reply.get("Uploads", [])
    return uploads


async def stored(s3: Any, bucket: str, key: str) -> tuple[bytes, str]:
    """An object's bytes and ETag."""
    reply = await s3.get_object(Bucket=bucket, Key=key)
    async with reply["Body"] as body:
        return await body.read(), reply["ETag"].strip('"')


async def write_in_chunks(upload: MultipartUpload, data: bytes, size: int = 777_777) -> None:
    """Feed `data` in odd-sized chunks, as an archive stream would."""
    for at in range(0, len(data), size):
        await upload.write(data[at : at + size])


async def upload_all(upload: MultipartUpload, data: bytes) -> int:
    """Write and complete, aborting on any error: the documented pattern."""
    try:
        await write_in_chunks(upload, data)
        return await upload.complete()
    except BaseException:
        await upload.abort()
        raise


class Flaky:
    """A client whose upload_part is slow, counted, and fails at part `fail_at`."""

    def __init__(self, client: Any, *, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.client = client
        self.delay = delay
        self.fail_at = fail_at
        self.uploading = 0
        self.most_uploading = 0
        self.bytes_uploading = 0
        self.most_bytes_uploading = 0
        self.started = asyncio.Event()
        self.buffers: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    async def upload_part(self, **params: Any) -> Any:
        """Upload one part, slowly, or fail."""
        size = len(params["Body"])
        self.buffers.add(id(params["Body"].buffer))
        self.uploading += 1
        self.bytes_uploading += size
        self.most_uploading = max(self.most_uploading, self.uploading)
        self.most_bytes_uploading = max(self.most_bytes_uploading, self.bytes_uploading)
        self.started.set()
        try:
            await asyncio.sleep(self.delay)
            if params["PartNumber"] == self.fail_at:
                error = {"Error": {"Code": "InternalError", "Message": "injected"}}
                raise ClientError(error, "UploadPart")
            return await self.client.upload_part(**params)
        finally:
            self.uploading -= 1
            self.bytes_uploading -= size


@pytest.mark.parametrize(
    ("max_archive_bytes", "part_size"),
    [
        (1, MIN_PART),
        (10 * 1024 * MIB, MIN_PART),  # 10 GiB fits 10,000 parts of 8 MiB
        (10_000 * MIN_PART, MIN_PART),
        (10_000 * MIN_PART + 1, 9 * MIB),
        (100 * 1024 * MIB, 11 * MIB),
        (1024 * 1024 * MIB, 105 * MIB),
        (5 * 1024 * 1024 * MIB, 525 * MIB),
    ],
)
def test_part_size_for(max_archive_bytes: int, part_size: int) -> None:
    size = part_size_for(max_archive_bytes)
    assert size == part_size
    assert size % MIB == 0
    assert size * 10_000 >= max_archive_bytes


@pytest.mark.parametrize("max_archive_bytes", [0, -1, 5 * 1024 * 1024 * MIB + 1])
def test_part_size_for_refuses_what_s3_cannot_hold(max_archive_bytes: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        part_size_for(max_archive_bytes)


async def test_smaller_than_one_part(s3: Any, bucket: str) -> None:
    upload = MultipartUpload(s3, bucket, "small.zip", part_size=PART)
    await upload.start()
    await upload.write(b"tiny archive")
    assert await upload.complete() == 12
    body, etag = await stored(s3, bucket, "small.zip")
    assert body == b"tiny archive"
    assert etag.endswith("-1")  # still a multipart object, of one part
    assert await uploads_in(s3, bucket) == []


async def test_exactly_n_parts(s3: Any, bucket: str) -> None:
    data = os.urandom(3 * PART)
    upload = MultipartUpload(s3, bucket, "three.zip", part_size=PART)
    await upload.start()
    await write_in_chunks(upload, data)
    assert await upload.complete() == len(data) == upload.bytes_uploaded
    body, etag = await stored(s3, bucket, "three.zip")
    assert body == data
    assert etag.endswith("-3")  # no empty fourth part


def crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


def encode(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


async def test_parts_carry_their_crc32_and_go_unsigned(local: Any, s3: Any, bucket: str) -> None:
    """On the wire: each part's own CRC-32, no SHA-256 of the body, a composite object CRC."""
    objects = ObjectStore(
        bucket=bucket,
        region="us-east-1",
        endpoint_url=local.s3_endpoint_url,
        link_ttl=60,
        public_base_url=None,
    )
    sent: list[tuple[bytes, dict[str, str]]] = []

    def record(request: Any, **_: Any) -> None:
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        sent.append((request.body.read(), headers))
        request.body.seek(0)

    data = os.urandom(2 * PART + 999)
    async with objects.running():
        objects.client.meta.events.register("before-send.s3.UploadPart", record)
        upload = MultipartUpload(objects.client, bucket, "crc.zip", part_size=PART)
        await upload.start()
        await write_in_chunks(upload, data)
        await upload.complete()
        head = await objects.client.head_object(
            Bucket=bucket, Key="crc.zip", ChecksumMode="ENABLED"
        )

    assert [len(body) for body, _ in sent] == [PART, PART, 999]
    for body, headers in sent:
        assert headers["x-amz-checksum-crc32"] == encode(zlib.crc32(body))
        assert headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    # The object's checksum is composite: the CRC-32 of the parts' CRC-32s (S3 adds "-3").
    composite = zlib.crc32(b"".join(crc32(body) for body, _ in sent))
    assert head["ChecksumCRC32"].split("-")[0] == encode(composite)
    assert (await stored(s3, bucket, "crc.zip"))[0] == data


async def test_no_checksums_where_the_client_is_told_when_required(
    local: Any, s3: Any, bucket: str
) -> None:
    """AWS_REQUEST_CHECKSUM_CALCULATION=when_required (S3-compatible servers without checksums)."""
    config = AioConfig(request_checksum_calculation="when_required")
    sent: list[dict[str, Any]] = []
    async with get_session().create_client(
        "s3", endpoint_url=local.s3_endpoint_url, region_name="us-east-1", config=config
    ) as plain:
        plain.meta.events.register(
            "before-send.s3", lambda request, **_: sent.append(dict(request.headers))
        )
        upload = MultipartUpload(plain, bucket, "plain.zip", part_size=PART)
        await upload.start()
        await write_in_chunks(upload, data := os.urandom(PART + 10))
        await upload.complete()
    assert len(sent) == 4  # create, two parts, complete
    assert not [name for headers in sent for name in headers if "checksum" in name.lower()]
    assert (await stored(s3, bucket, "plain.zip"))[0] == data


async def test_many_parts_upload_concurrently_within_bounds(s3: Any, bucket: str) -> None:
    data = os.urandom(7 * PART + 12345)
    client = Flaky(s3, delay=0.2)
    upload = MultipartUpload(client, bucket, "many.zip", part_size=PART, parts_in_flight=3)
    await upload.start()
    most_held = 0
    for at in range(0, len(data), 1 << 20):
        await upload.write(data[at : at + (1 << 20)])
        most_held = max(most_held, upload._buffered + client.bytes_uploading)
    assert await upload.complete() == len(data)

    body, etag = await stored(s3, bucket, "many.zip")
    assert body == data
    assert etag.endswith("-8")
    assert client.most_uploading == 3
    assert most_held <= (3 + 1) * PART
    # Eight parts went through three part buffers, one per part in flight.
    assert len(client.buffers) == 3
    assert await uploads_in(s3, bucket) == []


async def test_failure_mid_way_aborts(s3: Any, bucket: str) -> None:
    upload = MultipartUpload(Flaky(s3, fail_at=3), bucket, "broken.zip", part_size=PART)
    await upload.start()
    with pytest.raises(UploadError, match=r"broken\.zip"):
        await upload_all(upload, os.urandom(6 * PART))
    assert await uploads_in(s3, bucket) == []
    with pytest.raises(ClientError, match="404"):
        await s3.head_object(Bucket=bucket, Key="broken.zip")


async def test_context_manager_aborts_on_error_and_never_completes(s3: Any, bucket: str) -> None:
    async def failing_block() -> None:
        async with MultipartUpload(s3, bucket, "a.zip", part_size=PART) as upload:
            await write_in_chunks(upload, os.urandom(PART + 1))
            raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError, match="caller failed"):
        await failing_block()
    assert await uploads_in(s3, bucket) == []

    async with MultipartUpload(s3, bucket, "b.zip", part_size=PART) as upload:
        await upload.write(b"forgot to complete")
    assert await uploads_in(s3, bucket) == []
    with pytest.raises(ClientError, match="404"):
        await s3.head_object(Bucket=bucket, Key="b.zip")

    async with MultipartUpload(s3, bucket, "c.zip", part_size=PART) as upload:
        await upload.write(b"done")
        await upload.complete()
    assert (await stored(s3, bucket, "c.zip"))[0] == b"done"


@pytest.mark.parametrize("style", ["context", "explicit"])
async def test_cancellation_aborts(s3: Any, bucket: str, style: str) -> None:
    client = Flaky(s3, delay=0.5)

    async def run() -> None:
        if style == "context":
            async with MultipartUpload(client, bucket, "c.zip", part_size=PART) as upload:
                await write_in_chunks(upload, os.urandom(10 * PART))
                await upload.complete()
            return
        upload = MultipartUpload(client, bucket, "c.zip", part_size=PART)
        await upload.start()
        await upload_all(upload, os.urandom(10 * PART))

    task = asyncio.create_task(run())
    await client.started.wait()
    assert len(await uploads_in(s3, bucket)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await uploads_in(s3, bucket) == []


async def test_abort_is_idempotent_and_spares_a_completed_object(s3: Any, bucket: str) -> None:
    await MultipartUpload(s3, bucket, "never.zip", part_size=PART).abort()  # nothing to do
    upload = MultipartUpload(s3, bucket, "k.zip", part_size=PART)
    await upload.start()
    await upload.write(b"x")
    await upload.abort()
    await upload.abort()
    assert await uploads_in(s3, bucket) == []
    with pytest.raises(UploadError):
        await upload.write(b"more")

    done = MultipartUpload(s3, bucket, "done.zip", part_size=PART)
    await done.start()
    await done.write(b"kept")
    await done.complete()
    await done.abort()
    assert (await stored(s3, bucket, "done.zip"))[0] == b"kept"


async def test_abort_upload_by_id_for_a_takeover(s3: Any, bucket: str) -> None:
    reply = await s3.create_multipart_upload(Bucket=bucket, Key="dead.zip")
    upload_id = reply["UploadId"]
    await s3.upload_part(
        Bucket=bucket, Key="dead.zip", UploadId=upload_id, PartNumber=1, Body=b"x" * 100
    )
    await abort_upload(s3, bucket, "dead.zip", upload_id)
    assert await uploads_in(s3, bucket) == []
    await abort_upload(s3, bucket, "dead.zip", upload_id)  # already gone: fine


async def lifecycle_rules(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """The bucket's lifecycle rules ([] when it has none)."""
    try:
        reply = await s3.get_bucket_lifecycle_configuration(Bucket=bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchLifecycleConfiguration":
            return []
        raise
    rules: list[dict[str, Any]] = reply["Rules"]
    return rules


async def test_ensure_bucket_creates_with_an_abort_rule(s3: Any) -> None:
    name = f"new-{uuid.uuid4().hex[:16]}"
    await ensure_bucket(s3, name, region="us-east-1")
    await s3.head_bucket(Bucket=name)
    (rule,) = await lifecycle_rules(s3, name)
    assert rule["Status"] == "Enabled"
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    await ensure_bucket(s3, name, region="us-east-1")  # exists now: left alone
    assert len(await lifecycle_rules(s3, name)) == 1


async def test_ensure_bucket_keeps_an_existing_buckets_rules(s3: Any, bucket: str) -> None:
    await ensure_bucket(s3, bucket, region="us-east-1")
    assert await lifecycle_rules(s3, bucket) == []

    operators = {
        "ID": "operator-expiry",
        "Status": "Enabled",
        "Filter": {"Prefix": "old/"},
        "Expiration": {"Days": 30},
    }
    await s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [operators]}
    )
    await ensure_bucket(s3, bucket, region="us-east-1")
    (rule,) = await lifecycle_rules(s3, bucket)
    assert rule["ID"] == "operator-expiry"
    assert "AbortIncompleteMultipartUpload" not in rule


async def test_ensure_bucket_goes_on_without_lifecycle_support(
    s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class NoLifecycle:
        def __getattr__(self, name: str) -> Any:
            return getattr(s3, name)

        async def put_bucket_lifecycle_configuration(self, **params: Any) -> Any:
            error = {"Error": {"Code": "NotImplemented", "Message": "no lifecycle here"}}
            raise ClientError(error, "PutBucketLifecycleConfiguration")

    name = f"plain-{uuid.uuid4().hex[:16]}"
    with caplog.at_level(logging.WARNING, logger="satchel.multipart"):
        await ensure_bucket(NoLifecycle(), name, region="us-east-1")
    await s3.head_bucket(Bucket=name)
    assert "no lifecycle rule" in caplog.text
