"""Configuration from the environment: every variable of the contract's table, parsed once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

GIB = 1024**3


class ConfigError(ValueError):
    """A configuration variable holds a value Satchel cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not value >= 0:
        raise ConfigError(f"{name} must not be negative")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _optional(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


@dataclass(frozen=True)
class Settings:
    """Everything the process reads from its environment."""

    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "postgresql://postgres@127.0.0.1:54329/satchel"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "satchel-archives"
    s3_region: str = "us-east-1"
    archive_url_ttl: int = 604800
    job_concurrency: int = 4
    fetch_allowlist: tuple[str, ...] = ()
    max_file_bytes: int = GIB
    max_archive_bytes: int = 20 * GIB
    archive_public_base_url: str | None = None
    max_body_bytes: int = 1048576
    event_retention: int = 86400
    drain_timeout: float = 25.0
    cors_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    log_format: str = "json"
    # Not in the contract's table: how long list pages are remembered (0 turns it off).
    page_cache_ttl: float = 2.0
    # Not in the contract's table either: where archives are formed ("process": a child
    # process of the instance, at a lower CPU priority; "inline": the API's own event loop).
    archive_worker: str = "process"
    archive_worker_nice: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (the process environment by default)."""
        env = os.environ if env is None else env
        log_format = env.get("LOG_FORMAT", "json").strip().lower() or "json"
        if log_format not in ("json", "text"):
            raise ConfigError("LOG_FORMAT must be 'json' or 'text'")
        archive_worker = env.get("ARCHIVE_WORKER", "").strip().lower() or cls.archive_worker
        if archive_worker not in ("process", "inline"):
            raise ConfigError("ARCHIVE_WORKER must be 'process' or 'inline'")
        return cls(
            host=env.get("HOST", "").strip() or cls.host,
            port=_int(env, "PORT", cls.port),
            database_url=env.get("DATABASE_URL", "").strip() or cls.database_url,
            s3_endpoint_url=_optional(env, "S3_ENDPOINT_URL"),
            s3_bucket=env.get("S3_BUCKET", "").strip() or cls.s3_bucket,
            s3_region=env.get("S3_REGION", "").strip() or cls.s3_region,
            archive_url_ttl=_int(env, "ARCHIVE_URL_TTL", cls.archive_url_ttl, minimum=1),
            job_concurrency=_int(env, "JOB_CONCURRENCY", cls.job_concurrency),
            fetch_allowlist=_list(env, "FETCH_ALLOWLIST"),
            max_file_bytes=_int(env, "MAX_FILE_BYTES", cls.max_file_bytes, minimum=1),
            max_archive_bytes=_int(env, "MAX_ARCHIVE_BYTES", cls.max_archive_bytes, minimum=1),
            archive_public_base_url=_optional(env, "ARCHIVE_PUBLIC_BASE_URL"),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            event_retention=_int(env, "EVENT_RETENTION", cls.event_retention, minimum=1),
            drain_timeout=_float(env, "DRAIN_TIMEOUT", cls.drain_timeout),
            cors_origins=_list(env, "CORS_ORIGINS"),
            log_level=(env.get("LOG_LEVEL", "").strip() or cls.log_level).upper(),
            log_format=log_format,
            page_cache_ttl=_float(env, "PAGE_CACHE_TTL", cls.page_cache_ttl),
            archive_worker=archive_worker,
            archive_worker_nice=_int(env, "ARCHIVE_WORKER_NICE", cls.archive_worker_nice),
        )
