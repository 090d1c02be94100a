"""Shared test helpers: load an algorithm script as a module, run scripts through subprocess.

Torch is limited to one thread: the networks in these tests are tiny, and on a loaded 2-core
machine a second torch thread makes each small matmul spin instead of compute (hundreds of
times slower). The subprocess runs get the same limit through OMP_NUM_THREADS.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ALGOS = REPO / "algos"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.scripts import load_script as shared_load_script  # noqa: E402

torch.set_num_threads(1)

_loaded: dict[str, object] = {}


def load_script(name: str):
    """Import algos/<name>.py as a module, once per test session."""
    if name not in _loaded:
        _loaded[name] = shared_load_script(name)
    return _loaded[name]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def run_script(script: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 300.0,
               cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``algos/<script>.py argv...`` with the venv python; captures text stdout/stderr."""
    return subprocess.run(
        [PYTHON, str(ALGOS / f"{script}.py"), *argv],
        capture_output=True, text=True, timeout=timeout, env=env or subprocess_env(), cwd=cwd or REPO,
    )


class ScriptRuns:
    """Subprocess runs started together, two at a time (a 2-core machine), collected per test.

    Only the runs of tests that pytest actually selected are started."""

    def __init__(self, jobs: dict[str, dict], workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures: dict[str, Future] = {
            name: self._pool.submit(run_script, job["script"], job["argv"], job.get("env"))
            for name, job in jobs.items()
        }

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def selected_test_names(request: pytest.FixtureRequest) -> set[str]:
    """Names (without parameters) of the tests selected in the requesting module."""
    path = request.node.path
    return {item.originalname or item.name for item in request.session.items if item.path == path}


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"exit code {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}"
            f"\n--- stderr (tail)\n{proc.stderr[-3000:]}")


def read_wandb_records(path: str | os.PathLike) -> list:
    """The records of an offline run's ``run-*.wandb`` file, parsed with wandb's own protobufs.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks
    of chunks, each with a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle,
    4 last). No reader for it ships in the wandb package, and the tests need to see what an offline
    run recorded (group, job type, tags, summary) without an account or a network."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = Path(path).read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_run_and_summary(path: str | os.PathLike) -> tuple:
    """(the run record: group, job type, tags; the summary as {key: value}) of an offline run file."""
    import json

    records = read_wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update if item.key}
    return run, summary
