"""The console in a real pseudo-terminal: the progress bar (tqdm) is redrawn in place at the terminal's width, and
log lines (checkpoint saved, eval, step lines) land above it, never glued to it."""

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from tests.conftest import ROOT, tiny_overrides

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _screen(raw: str) -> list[str]:
    """What a terminal shows: each line after applying carriage returns (later text overwrites from column 0)."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in ANSI.sub("", line).split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return [x for x in lines if x]


def _run_in_pty(cmd, cols: int) -> str:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    env = dict(os.environ, COLUMNS=str(cols), TERM="xterm", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("cols", [60, 160])
def test_progress_bar_and_log_lines_in_a_real_terminal(tiny_corpus, tmp_path, cols):
    cmd = [sys.executable, "-m", "apps.main.train"] + tiny_overrides(
        tiny_corpus, tmp_path, steps=20, logging__progress=True, logging__freq=10, checkpoint__dump__every=10,
        eval__every=10)
    screen = _screen(_run_in_pty(cmd, cols))
    bars = [x for x in screen if re.search(r"\d+/20 \[", x)]
    logs = [x for x in screen if "saved checkpoint" in x or " eval " in x or "| loss " in x]
    assert bars and all(len(x) <= cols for x in bars), bars  # fits the terminal: no new line per redraw
    assert len(bars) <= 3, bars  # redrawn in place: the final bar (and at most the eval bars' last frames)
    assert any("20/20" in x for x in bars)
    assert sum("saved checkpoint" in x for x in logs) == 2 and sum(" eval " in x for x in logs) >= 1
    for line in logs:  # every log line starts on its own line, not after a bar
        assert not re.search(r"\d+/20 \[", line), line
        assert re.match(r"(\d\d:\d\d:\d\d |step )", line), line


def test_train_as_a_library_keeps_the_root_logger(tiny_corpus, tmp_path):
    """An application that configured logging keeps its handlers; lingua's lines reach them."""
    import logging

    from lingua.args import load_config
    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    from lingua.train.loop import TrainArgs, train

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    root, mine = logging.getLogger(), Keep()
    root.addHandler(mine)
    try:
        before = list(root.handlers)
        train(load_config(TrainArgs, tiny_overrides(tiny_corpus, tmp_path, steps=1, eval__at_end=False)),
              TRANSFORMER_SPEC)
        assert root.handlers == before
        assert any(r.name.startswith("lingua") and "done at step 1" in r.getMessage() for r in mine.records)
    finally:
        root.removeHandler(mine)
