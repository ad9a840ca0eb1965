"""deploy/nginx/satchel.conf for real: `nginx -t`, then REST and a websocket through it.

The very file of the repository is used, with only its ports and log folder replaced, inside a
minimal main config that keeps everything nginx writes in a temporary prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from api_helpers import assert_problem

pytestmark = pytest.mark.slow

MAIN_CONF = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/satchel.conf;
}}
"""


@pytest.fixture(scope="module")
def nginx() -> str:
    """The nginx binary, installed from Debian's packages when missing (root only)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("nginx is not installed, and `apt-get install nginx` needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    assert found, "nginx installed but not found"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render(repo: Path, prefix: Path, *, listen: int, upstreams: list[int]) -> None:
    """The repo's site config with test ports and logs, and a main config around it."""
    text = (repo / "deploy" / "nginx" / "satchel.conf").read_text()
    servers = "".join(
        f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;\n" for port in upstreams
    )
    text, found = re.subn(r"(?m)(^    server 127\.0\.0\.1:\d+ .*\n)+", servers, text)
    assert found == 1, "the upstream block's server lines moved"
    text, found = re.subn(r"(?m)^    listen 80;$", f"    listen 127.0.0.1:{listen};", text)
    assert found == 1, "the listen line moved"
    text, found = re.subn(r"/var/log/nginx/", f"{prefix}/", text)
    assert found == 1, "the access log moved"
    (prefix / "satchel.conf").write_text(text)
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the temporary prefix
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(user=user, prefix=prefix))


def _command(nginx: str, prefix: Path) -> list[str]:
    return [nginx, "-p", f"{prefix}/", "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"]


@contextlib.asynccontextmanager
async def running_nginx(nginx: str, prefix: Path, port: int) -> AsyncIterator[str]:
    """nginx in the foreground on `port`; stopped gracefully (SIGQUIT) at the end."""
    check = await asyncio.create_subprocess_exec(
        *_command(nginx, prefix), "-t", stderr=asyncio.subprocess.PIPE
    )
    _, errors = await check.communicate()
    assert check.returncode == 0, errors.decode()
    assert b"test is successful" in errors
    process = await asyncio.create_subprocess_exec(*_command(nginx, prefix), "-g", "daemon off;")
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.returncode is None, (prefix / "error.log").read_text()
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode == 0, (prefix / "error.log").read_text()


class Reply:
    """What the client saw through nginx."""

    def __init__(self, reply: tornado.httpclient.HTTPResponse) -> None:
        self.code = reply.code
        self.headers = reply.headers
        self.body = reply.body or b""

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


async def fetch(
    url: str, method: str = "GET", body: Any = None, *, raw: bytes | None = None, **headers: str
) -> Reply:
    """One request; `body` is sent as JSON."""
    if body is not None:
        raw = json.dumps(body).encode()
    if raw is not None:
        headers.setdefault("Content-Type", "application/json")
    reply = await tornado.httpclient.AsyncHTTPClient().fetch(
        url,
        method=method,
        body=raw,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        raise_error=False,
        request_timeout=20,
    )
    return Reply(reply)


def access_log(prefix: Path) -> list[dict[str, Any]]:
    """nginx's JSON access log lines."""
    return [json.loads(line) for line in (prefix / "satchel.access.log").read_text().splitlines()]


async def test_rest_and_websocket_through_nginx(
    nginx: str, make_server: Any, tmp_path: Path, repo_root: Path
) -> None:
    prefix = tmp_path
    instances = [await make_server(), await make_server()]
    ports = [int(app.url.rsplit(":", 1)[1]) for app in instances]
    listen = _free_port()
    render(repo_root, prefix, listen=listen, upstreams=ports)
    async with running_nginx(nginx, prefix, listen) as url:
        socket_ = await tornado.websocket.websocket_connect(url.replace("http", "ws") + "/ws")
        created = await fetch(
            f"{url}/projects",
            "POST",
            {"name": "Proxied", "price": "10"},
            X_Request_ID="via-nginx-1",
        )
        assert created.code == 201, created.body
        assert created.headers["X-Request-ID"] == "via-nginx-1"
        project = created.json()
        message = json.loads(await asyncio.wait_for(socket_.read_message(), 10))
        assert message["type"] == "project.created"
        assert message["project"]["uuid"] == project["uuid"]
        socket_.close()

        generated = set()
        for _ in range(3):
            alive = await fetch(f"{url}/health")
            assert alive.code == 200
            assert re.fullmatch(r"[0-9a-f]{32}", alive.headers["X-Request-ID"])
            generated.add(alive.headers["X-Request-ID"])
        # A body a little over MAX_BODY_BYTES gets Satchel's own 413; a far bigger one nginx's.
        for size, detail in ((1536 * 1024, "1048576 bytes"), (3 * 1024 * 1024, "2 MiB")):
            big = await fetch(f"{url}/projects", "POST", raw=b" " * size)
            assert detail in assert_problem(big, 413, "payload_too_large")["detail"]

    lines = access_log(prefix)
    by_uri = {(line["method"], line["uri"], line["status"]): line for line in lines}
    assert by_uri["POST", "/projects", 201]["request_id"] == "via-nginx-1"
    assert by_uri["GET", "/ws", 101]["seconds"] > 0
    assert {line["request_id"] for line in lines if line["uri"] == "/health"} == generated
    # Round robin: both instances answered.
    assert {line["upstream"] for line in lines if line["upstream"]} == {
        f"127.0.0.1:{port}" for port in ports
    }


async def test_no_instance_answering_is_a_503_problem(
    nginx: str, tmp_path: Path, repo_root: Path
) -> None:
    prefix = tmp_path
    listen = _free_port()
    render(repo_root, prefix, listen=listen, upstreams=[_free_port()])
    async with running_nginx(nginx, prefix, listen) as url:
        response = await fetch(f"{url}/projects")
    assert_problem(response, 503, "service_unavailable")
    assert response.headers["Retry-After"] == "1"
