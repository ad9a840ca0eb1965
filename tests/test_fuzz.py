"""schemathesis against a live server (tests/fuzz/run.py) with CI's small budget: no 5xx and
every response as the OpenAPI document describes it. `make fuzz` runs the full budget."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUN = Path(__file__).resolve().parent / "fuzz" / "run.py"
# About a minute here; the full budget (1000 per operation) is for `make fuzz`.
CI_BUDGET = 50
# A fixed seed keeps CI reproducible; `make fuzz` draws a new one each time.
CI_SEED = 20261203
# Under pytest-timeout's 300 s, leaving room to stop everything cleanly.
TIMEOUT = 230


@pytest.mark.slow
def test_fuzzing_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(RUN),
        "--max-examples",
        str(CI_BUDGET),
        "--seed",
        str(CI_SEED),
        "--report-dir",
        str(tmp_path),
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # run.py stops its server and services on SIGTERM
            output, _ = proc.communicate(timeout=60)
            pytest.fail(f"fuzzing took over {TIMEOUT} s:\n{output[-20000:]}")
    assert proc.returncode == 0, output[-30000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated, output[-5000:]
    # The operations are exercised, not just loaded.
    assert int(generated.group(1)) >= 10 * CI_BUDGET, generated.group(0)
    assert "Stateful" in output


# What fuzzing found, kept as plain regression tests.


@pytest.mark.parametrize("path", ["/projects", "/tasks"])
async def test_an_offset_past_postgresql_bigint_is_a_422_not_a_500(app: Any, path: str) -> None:
    largest = 2**63 - 1
    reply = await app.fetch(f"{path}?offset={largest}")
    assert reply.code == 200, reply.body
    assert reply.json()["items"] == []
    reply = await app.fetch(f"{path}?offset={largest + 1}")
    assert reply.code == 422, reply.body
    assert set(reply.json()["errors"]) == {"offset"}
