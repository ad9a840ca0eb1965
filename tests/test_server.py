"""The process itself: settings from the environment, logging, `satchel serve` and `migrate`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
from typing import Any

import pytest
import tornado.httpclient

from server import logs
from server.config import ConfigError, Settings
from server.main import cli, serve


def test_settings_read_every_variable() -> None:
    env = {
        "HOST": "0.0.0.0",
        "PORT": "9001",
        "DATABASE_URL": "postgresql://u@h:1/d",
        "S3_ENDPOINT_URL": "http://s3.test",
        "S3_BUCKET": "b",
        "S3_REGION": "eu-west-1",
        "ARCHIVE_URL_TTL": "60",
        "JOB_CONCURRENCY": "2",
        "FETCH_ALLOWLIST": "a.test, 10.0.0.0/8 ,",
        "MAX_FILE_BYTES": "10",
        "MAX_ARCHIVE_BYTES": "20",
        "ARCHIVE_PUBLIC_BASE_URL": "https://cdn.test/",
        "MAX_BODY_BYTES": "100",
        "EVENT_RETENTION": "30",
        "DRAIN_TIMEOUT": "1.5",
        "CORS_ORIGINS": "https://app.test",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "text",
    }
    settings = Settings.from_env(env)
    assert settings.port == 9001 and settings.host == "0.0.0.0"
    assert settings.fetch_allowlist == ("a.test", "10.0.0.0/8")
    assert settings.drain_timeout == 1.5 and settings.log_level == "DEBUG"
    assert settings.cors_origins == ("https://app.test",)
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    "env",
    [
        {"PORT": "http"},
        {"MAX_BODY_BYTES": "0"},
        {"DRAIN_TIMEOUT": "-1"},
        {"DRAIN_TIMEOUT": "x"},
        {"LOG_FORMAT": "xml"},
    ],
)
def test_bad_settings_are_refused_by_name(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_cli_refuses_bad_settings(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("PORT", "eighty")
    assert cli(["serve"]) == 2
    assert "PORT" in capsys.readouterr().err


def test_cli_migrates(monkeypatch: pytest.MonkeyPatch, local: Any) -> None:
    monkeypatch.setenv("DATABASE_URL", local.database_url)
    monkeypatch.setenv("LOG_FORMAT", "text")
    assert cli(["migrate"]) == 0


def test_json_log_lines_carry_extras_and_tracebacks() -> None:
    formatter = logs.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "satchel.x", logging.ERROR, __file__, 1, "failed %s", ("it",), sys.exc_info()
        )
    record.request_id = "abc"
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "failed it" and entry["request_id"] == "abc"
    assert entry["level"] == "ERROR" and entry["time"].endswith("Z")
    assert "ValueError: boom" in entry["traceback"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_configure_installs_one_handler(fmt: str) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("WARNING", fmt)
        assert len(root.handlers) == 1 and root.level == logging.WARNING
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_serve_answers_then_stops_on_sigterm(settings: Settings) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    running = asyncio.ensure_future(serve(dataclasses.replace(settings, port=port)))
    client = tornado.httpclient.AsyncHTTPClient()
    for _ in range(100):
        try:
            reply = await client.fetch(f"http://127.0.0.1:{port}/health")
            break
        except OSError:
            await asyncio.sleep(0.05)
    assert reply.code == 200
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(running, 30)
    with pytest.raises(OSError):
        await client.fetch(f"http://127.0.0.1:{port}/health")
