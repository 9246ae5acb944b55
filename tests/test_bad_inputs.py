"""Every bad input in tests/bad_inputs.py, through the real command lines: exit code, at most 4 stderr lines, no
traceback, a line naming the key or file, no file lost (the table it prints is in README's "When something is
wrong")."""

import json
import subprocess
import sys

import pytest

from tests.bad_inputs import CASES
from tests.conftest import ROOT


@pytest.mark.slow
def test_every_bad_input_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.bad_inputs", "--json", str(tmp_path / "rows.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["case"] for r in rows] == [c.name for c in CASES]
    bad = {r["case"]: r["problem"] for r in rows if r["problem"]}
    assert not bad and out.returncode == 0, (bad, out.stdout[-3000:], out.stderr[-3000:])
    for r in rows:
        assert r["stderr_lines"] <= 4 and not r["traceback"] and not r["lost"] and r["line"], r
