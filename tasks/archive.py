"""One archive run: download every URL of a task, zip, upload, verify, and mark it finished.

Downloading, zipping (a worker thread) and uploading (several parts in flight) overlap; the
only buffers are the fetcher's small queue, the zipper's queue and the parts in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuid_module
from collections.abc import AsyncIterator, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage.jobs import Fenced, JobStore, RunStart
from storage.multipart import MultipartUpload, UploadError, abort_upload
from storage.s3 import ObjectStore
from tasks.fetcher import Chunk, Download, Fetcher, FetchError
from tasks.progress import Progress
from tasks.verify import ArchiveMismatch, verify_archive
from tasks.zipper import ArchiveError, ArchiveStream, entry_name, should_compress

log = logging.getLogger("satchel.archive")
# Progress is written at most this often; the latest value is always flushed at the end.
PROGRESS_INTERVAL = 0.5


class ArchiveTooLarge(Exception):
    """The files add up to more than MAX_ARCHIVE_BYTES."""


def archive_key(task_id: uuid_module.UUID, epoch: int) -> str:
    """The object key of a run's archive: a superseded run can never overwrite a newer one."""
    return f"archives/{task_id}/{epoch}.zip"


class ArchiveRun:
    """Forms the archive of one task, fenced by the epoch it took the task with."""

    def __init__(
        self,
        *,
        jobs: JobStore,
        objects: ObjectStore,
        fetcher: Fetcher,
        max_archive_bytes: int,
        part_size: int,
        parts_in_flight: int,
        metrics: Any = None,
    ) -> None:
        self.jobs = jobs
        self.objects = objects
        self.fetcher = fetcher
        self.max_archive_bytes = max_archive_bytes
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        self.metrics = metrics
        self.received = 0
        # Create -> complete of the multipart upload, and the read-back check: for the log.
        self.upload_seconds = 0.0
        self.verify_seconds = 0.0

    async def execute(self, task_id: uuid_module.UUID) -> None:
        """Run the task's archive to `finished` or `failed`, unless fenced or cancelled."""
        run = await self.jobs.begin(task_id)
        if run is None:
            return
        if run.previous_upload:
            epoch, upload_id = run.previous_upload
            await self._abort_previous(archive_key(task_id, epoch), upload_id)
        key = archive_key(task_id, run.epoch)
        client = self.objects.client
        upload = MultipartUpload(
            client,
            self.objects.bucket,
            key,
            part_size=self.part_size,
            parts_in_flight=self.parts_in_flight,
        )
        started = time.monotonic()
        self._count("archives", "started")
        try:
            await self._form(run, upload)
            await self.jobs.check(run)
            await upload.complete()
            self.upload_seconds = time.monotonic() - self._upload_started
        except Fenced:
            await self._abort(upload)
            return
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(upload))
            raise
        except (
            FetchError,
            ArchiveTooLarge,
            ArchiveError,
            UploadError,
            ClientError,
            BotoCoreError,
            OSError,
        ) as exc:
            await self._abort(upload)
            await self._fail(run, _reason(exc), kind=_kind(exc))
            return
        await self._store(run, key, started)

    async def _store(self, run: RunStart, key: str, started: float) -> None:
        """Verify the uploaded object, then mark the task finished (or clean up if fenced)."""
        try:
            checked = time.monotonic()
            await verify_archive(
                self.objects.client,
                self.objects.bucket,
                key,
                expected=self._archive.entries,
                size=self._archive.bytes_out,
            )
            self.verify_seconds = time.monotonic() - checked
            await self.jobs.finish(run, key)
            await self.jobs.check(run)
        except Fenced:
            await self._delete(key)
            return
        except (ArchiveMismatch, ClientError, BotoCoreError, OSError) as exc:
            await self._delete(key)
            await self._fail(run, f"the stored archive did not verify: {exc}", kind="verify")
            return
        await self._delete_superseded(run.task_id, key)
        self._count("archives", "finished")
        if self.metrics is not None:
            self.metrics.archive_seconds.observe(time.monotonic() - started)
        log.info(
            "archive of %s finished",
            run.task_id,
            extra={
                "task_id": str(run.task_id),
                "seconds": round(time.monotonic() - started, 3),
                "upload_seconds": round(self.upload_seconds, 3),
                "verify_seconds": round(self.verify_seconds, 3),
                "bytes": self._archive.bytes_out,
            },
        )

    async def _form(self, run: RunStart, upload: MultipartUpload) -> None:
        self._upload_started = time.monotonic()
        upload_id = await upload.start()
        await self.jobs.set_upload(run, upload_id)
        self._archive = archive = ArchiveStream()
        progress = Progress(len(run.urls))
        # Adding (download -> zip) and pumping (zip -> S3) fail together: if the upload breaks,
        # nothing would read the zipper any more and the adder would wait forever.
        steps = [
            asyncio.ensure_future(self._add_all(run, archive, progress)),
            asyncio.ensure_future(self._pump(archive, upload)),
            asyncio.ensure_future(self._write_progress(run, progress)),
        ]
        try:
            await _first_failure(steps[:2], watch=steps[2])
        except BaseException:
            await archive.abort()
            raise
        finally:
            for step in steps:
                step.cancel()
            await asyncio.gather(*steps, return_exceptions=True)
        await self.jobs.progress(run, progress.percent())

    async def _add_all(self, run: RunStart, archive: ArchiveStream, progress: Progress) -> None:
        taken: set[str] = set()
        for index, url in enumerate(run.urls):
            async with self.fetcher.open(url) as download:
                progress.opened(index, download.size)
                name = entry_name(download.name, taken)
                compress = should_compress(name, download.content_type)
                await archive.add(name, self._counted(download, progress, index), compress=compress)
            progress.finished(index)
        await archive.close()

    async def _counted(
        self, download: Download, progress: Progress, index: int
    ) -> AsyncIterator[Chunk]:
        async for chunk in download:
            self.received += len(chunk)
            if self.received > self.max_archive_bytes:
                raise ArchiveTooLarge(
                    f"the files add up to more than the archive limit of {self.max_archive_bytes}"
                    " bytes"
                )
            progress.add(index, len(chunk))
            if self.metrics is not None:
                self.metrics.bytes_downloaded.inc(len(chunk))
            yield chunk

    async def _pump(self, archive: ArchiveStream, upload: MultipartUpload) -> None:
        async for chunk in archive:
            await upload.write(chunk)
            if self.metrics is not None:
                self.metrics.bytes_uploaded.inc(len(chunk))

    async def _write_progress(self, run: RunStart, progress: Progress) -> None:
        written = 0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            value = progress.percent()
            if value > written:
                await self.jobs.progress(run, value)
                written = value
            else:
                await self.jobs.check(run)

    def _count(self, metric: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(label).inc()

    async def _fail(self, run: RunStart, reason: str, *, kind: str) -> None:
        log.warning("archive of %s failed: %s", run.task_id, reason)
        self._count("archives", "failed")
        self._count("archive_failures", kind)
        with contextlib.suppress(Fenced):
            await self.jobs.fail(run, reason)

    async def _abort(self, upload: MultipartUpload) -> None:
        """Abort the run's upload; one S3 does not confirm gone is kept to abort later."""
        try:
            await upload.abort()
        except (UploadError, ClientError, BotoCoreError, OSError) as exc:
            log.warning("could not abort upload %s yet: %s", upload.upload_id, exc)
            if upload.upload_id:
                await self._remember(upload.key, upload.upload_id)

    async def _abort_previous(self, key: str, upload_id: str) -> None:
        try:
            await abort_upload(self.objects.client, self.objects.bucket, key, upload_id)
        except (UploadError, ClientError, BotoCoreError, OSError) as exc:
            log.warning("could not abort the upload of a previous run yet: %s", exc)
            await self._remember(key, upload_id)

    async def _remember(self, key: str, upload_id: str) -> None:
        try:
            await self.jobs.remember_orphan(key, upload_id)
        except Exception:  # the bucket's lifecycle rule is the last resort then
            log.exception("could not record upload %s for a later abort", upload_id)

    async def _delete_superseded(self, task_id: uuid_module.UUID, key: str) -> None:
        """Remove archives of earlier epochs (an old run may have completed late)."""
        try:
            listing = await self.objects.client.list_objects_v2(
                Bucket=self.objects.bucket, Prefix=f"archives/{task_id}/"
            )
            for item in listing.get("Contents", []):
                if item["Key"] != key:
                    await self._delete(item["Key"])
        except (ClientError, BotoCoreError, OSError) as exc:
            log.warning("could not remove superseded archives of %s: %s", task_id, exc)

    async def _delete(self, key: str) -> None:
        with contextlib.suppress(ClientError, BotoCoreError, OSError):
            await self.objects.client.delete_object(Bucket=self.objects.bucket, Key=key)


async def _first_failure(
    steps: Sequence[asyncio.Future[None]], *, watch: asyncio.Future[None]
) -> None:
    """Wait for every step; the first failure (or a failure of `watch`) is raised at once."""
    pending: set[asyncio.Future[None]] = {*steps, watch}
    while pending - {watch}:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for step in done:
            step.result()


def _kind(exc: BaseException) -> str:
    """A small, fixed set of failure reasons for the metric's label."""
    if isinstance(exc, FetchError):
        return "fetch"
    if isinstance(exc, ArchiveTooLarge):
        return "too_large"
    return "storage"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FetchError | ArchiveTooLarge):
        return str(exc)
    # Clients see the kind of failure, not internal endpoints or bucket paths (those are logged).
    cause = exc.__cause__ or exc
    log.warning("storing an archive failed: %s (%r)", exc, cause)
    return f"storing the archive failed ({type(cause).__name__})"
