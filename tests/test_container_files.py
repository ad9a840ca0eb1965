"""Dockerfile and docker-compose.yml name only commands, files and variables that exist.

No Docker engine runs here, so both files are read instead: every `satchel` command must be a
console script of setup.py with one of its subcommands, every COPY source and build context
must be in the repository, every variable set for Satchel must be one it reads (and parse), and
the health check must hit a real route.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from server.app import ROUTES
from server.config import ConfigError, Settings

REPO = Path(__file__).resolve().parent.parent
# Read by botocore's standard credential chain rather than by Settings.
AWS_CHAIN = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
# The interpreter's own switches, fine to set in the image.
PYTHON_SWITCHES = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


def satchel_variables() -> set[str]:
    """Every variable `Settings.from_env` reads, plus the AWS credential chain's."""
    return set(re.findall(r'"([A-Z][A-Z0-9_]+)"', inspect.getsource(Settings.from_env))) | AWS_CHAIN


def console_scripts() -> set[str]:
    """The console scripts setup.py installs."""
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return {entry.split("=", 1)[0].strip() for entry in scripts}
    raise AssertionError("setup.py has no entry_points")


def satchel_commands() -> set[str]:
    """`satchel`'s subcommands: the argparse choices in server/main.py."""
    for node in ast.walk(ast.parse((REPO / "server" / "main.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "choices":
            return set(ast.literal_eval(node.value))
    raise AssertionError("server/main.py has no command choices")


def commands(words: list[str]) -> list[list[str]]:
    """The commands (program first) in an argv, looking inside `sh -c` scripts."""
    if len(words) >= 3 and Path(words[0]).name in ("sh", "bash") and words[1] == "-c":
        lexer = shlex.shlex(words[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        found: list[list[str]] = []
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                found += commands(current)
                current = []
            else:
                current.append(token)
        return found
    while words and (words[0] == "exec" or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
        words = words[1:]
    return [words] if words else []


def command_problems(words: list[str]) -> list[str]:
    """Problems with the `satchel ...` commands in an argv: unknown script or subcommand."""
    problems = []
    for program, *arguments in commands(words):
        if not re.match(r"^satchel\b", program):
            continue
        after = arguments[0] if arguments else ""
        if program not in console_scripts():
            problems.append(f"{program}: no such console script in setup.py")
        elif after not in satchel_commands():
            problems.append(f"`{program} {after}`: no such satchel command")
    return problems


def environment_problems(env: dict[str, str], allowed: set[str]) -> list[str]:
    """Variables Satchel does not read, and values it would refuse at start."""
    problems = [f"{name}: Satchel reads no such variable" for name in sorted(set(env) - allowed)]
    try:
        Settings.from_env({k: v for k, v in env.items() if k in allowed})
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def route_problems(url: str) -> list[str]:
    """The URL's path must be one of the app's routes."""
    path = urlsplit(url).path
    if any(re.fullmatch(pattern, path) for pattern, *_ in ROUTES):
        return []
    return [f"{path}: no such route"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", kept)
    found = []
    for line in joined.splitlines():
        if line.strip():
            name, _, rest = line.strip().partition(" ")
            found.append((name.upper(), rest.strip()))
    return found


def _words(arguments: str) -> list[str]:
    """The argv of an exec-form (JSON array) or shell-form instruction."""
    return list(json.loads(arguments)) if arguments.startswith("[") else ["sh", "-c", arguments]


def dockerfile_problems(text: str, context: Path = REPO) -> list[str]:
    """Everything the Dockerfile names that does not exist."""
    problems = []
    for name, arguments in dockerfile_instructions(text):
        if name in ("COPY", "ADD"):
            *sources, _target = [w for w in shlex.split(arguments) if not w.startswith("--")]
            missing = [source for source in sources if not (context / source).exists()]
            problems += [f"COPY {source}: not in the repository" for source in missing]
        elif name == "ENV":
            pairs = dict(word.split("=", 1) for word in shlex.split(arguments))
            problems += environment_problems(pairs, satchel_variables() | PYTHON_SWITCHES)
        elif name in ("CMD", "ENTRYPOINT", "RUN"):
            problems += command_problems(_words(arguments))
        elif name == "HEALTHCHECK":
            words = _words(re.split(r"(?:^|\s)CMD\s", arguments, maxsplit=1)[-1])
            problems += command_problems(words)
            for url in re.findall(r"http://[^'\"\s]+", " ".join(words)):
                problems += route_problems(url)
    return problems


def satchel_services(compose: dict[str, Any]) -> dict[str, Any]:
    """The services that run Satchel: built from this repository, or running `satchel`."""
    found = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        words = _words(command) if isinstance(command, str) else list(command)
        if "build" in service or any(c[0].startswith("satchel") for c in commands(words)):
            found[name] = service
    return found


def compose_problems(text: str, context: Path = REPO) -> list[str]:
    """Everything docker-compose.yml names that does not exist."""
    compose = yaml.safe_load(text)
    services = satchel_services(compose)
    problems = [] if services else ["no service runs Satchel"]
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            dockerfile = context / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.exists():
                problems.append(f"{name}: no {dockerfile}")
        for key in ("command", "entrypoint"):
            value = service.get(key) or []
            problems += command_problems(_words(value) if isinstance(value, str) else list(value))
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            if not (context / env_file).exists():
                problems.append(f"{name}: no env_file {env_file}")
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        env = {k: str(v) for k, v in env.items()}
        problems += environment_problems(env, satchel_variables())
        for variable in ("DATABASE_URL", "S3_ENDPOINT_URL"):
            host = urlsplit(env.get(variable, "")).hostname
            if host and host not in compose["services"]:
                problems.append(f"{name}: {variable} names {host}, which is no service")
    return problems


def test_dockerfile_names_only_what_exists() -> None:
    assert dockerfile_problems((REPO / "Dockerfile").read_text()) == []


def test_compose_names_only_what_exists() -> None:
    assert compose_problems((REPO / "docker-compose.yml").read_text()) == []


def test_image_runs_satchel_serve_as_a_user_like_supervisord() -> None:
    instructions = dockerfile_instructions((REPO / "Dockerfile").read_text())
    values = {name: arguments for name, arguments in instructions}
    assert values["FROM"] == "python:3.11-slim"
    assert values["USER"] not in ("root", "0")
    assert json.loads(values["CMD"]) == ["satchel", "serve"]
    assert "exec satchel serve" in (REPO / "deploy" / "run-satchel").read_text()
    assert values["EXPOSE"] == "8000"
    assert "/health" in values["HEALTHCHECK"]


def test_the_checks_catch_what_does_not_exist() -> None:
    dockerfile = "\n".join(
        [
            "FROM python:3.11-slim",
            "COPY server nowhere ./",
            "ENV SATCHEL_PORT=1 JOB_CONCURRENCY=many",
            'CMD ["satchel", "start"]',
            "HEALTHCHECK CMD python -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')\"",
            "RUN satchel-server migrate",
        ]
    )
    assert dockerfile_problems(dockerfile) == [
        "COPY nowhere: not in the repository",
        "SATCHEL_PORT: Satchel reads no such variable",
        "JOB_CONCURRENCY must be a whole number, not 'many'",
        "`satchel start`: no such satchel command",
        "/healthz: no such route",
        "satchel-server: no such console script in setup.py",
    ]
    compose = """
services:
  db: {image: postgres:15}
  api:
    build: {context: ., dockerfile: Containerfile}
    command: ["sh", "-c", "satchel migrate && satchel server"]
    environment: [DB_URL=x, "DATABASE_URL=postgresql://u@postgres/db"]
"""
    assert compose_problems(compose) == [
        f"api: no {REPO / 'Containerfile'}",
        "`satchel server`: no such satchel command",
        "DB_URL: Satchel reads no such variable",
        "api: DATABASE_URL names postgres, which is no service",
    ]


def test_readme_documents_every_variable() -> None:
    readme = (REPO / "README.md").read_text()
    operating = readme.split("## Operating Satchel", 1)[1]
    table = operating.split("### Configuration", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert satchel_variables() - documented == set()
