"""The PPO core between the marker comments is byte-identical in every algos/ppo_*.py."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

ALGOS = Path(__file__).resolve().parents[1] / "algos"
SCRIPTS = sorted(ALGOS.glob("ppo_*.py"))
REFERENCE = ALGOS / "ppo_mtl_embed.py"


def core_region(path: Path, part: str) -> str:
    """Text from the 'begin' marker line through the 'end' marker line of PPO CORE <part>."""
    lines = path.read_text().splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if line.startswith(f"# ==== PPO CORE {part}: begin")]
    end = [i for i, line in enumerate(lines) if line.startswith(f"# ==== PPO CORE {part}: end")]
    assert len(begin) == 1 and len(end) == 1, (
        f"{path.name}: expected one 'PPO CORE {part}' begin and one end marker, found {len(begin)} and {len(end)}")
    assert begin[0] < end[0], f"{path.name}: 'PPO CORE {part}' end marker comes before its begin marker"
    return "".join(lines[begin[0]:end[0] + 1])


def test_there_are_at_least_two_scripts_to_compare():
    assert len(SCRIPTS) >= 2, f"found {[p.name for p in SCRIPTS]}"
    assert REFERENCE in SCRIPTS


@pytest.mark.parametrize("part", ["1/2", "2/2"])
def test_core_region_is_identical_in_every_script(part):
    reference = core_region(REFERENCE, part)
    assert len(reference.splitlines()) > 20, "the core region is suspiciously short"
    for path in SCRIPTS:
        text = core_region(path, part)
        if text != reference:
            lines = difflib.unified_diff(reference.splitlines(keepends=True), text.splitlines(keepends=True),
                                         REFERENCE.name, path.name, n=1)
            diff = "".join(list(lines)[:40])
            pytest.fail(f"PPO CORE {part} of {path.name} differs from {REFERENCE.name}:\n{diff}")
