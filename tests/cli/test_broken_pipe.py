"""A reader that closes the pipe early (``kiosk ... | head``) ends the CLI quietly."""

from __future__ import annotations

import os
import subprocess
import sys


def test_output_into_a_closed_pipe_exits_quietly() -> None:
    # The reader is gone before kiosk writes: every write fails with EPIPE, deterministically.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kiosk_cli", "--print-completion", "bash"],
            stdout=write_end, stderr=subprocess.PIPE, timeout=60, check=False,
        )
    finally:
        os.close(write_end)
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert done.returncode == 141, (done.returncode, stderr)
