"""A Python child process that tells the test, a line at a time, how far it got, then prints its outcome.

The child's stdout is an unbuffered pipe on purpose: ``readline`` on a buffered pipe reads ahead, so a child
fast enough to print its progress line and its outcome together would have its outcome swallowed by that
read-ahead, and ``communicate`` (which reads the pipe's descriptor, not the buffer) would then find nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest


class PythonChild:
    """``python -c SCRIPT ARGS``, with stdout and stderr piped to the test."""

    def __init__(self, script: str, *args: object):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # see the module docstring
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def line(self) -> str:
        """The child's next line (with its newline), or "" once it closed stdout."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode()

    def expect(self, line: str) -> None:
        """Read the child's next line; fail the test, with what the child said, unless it is ``line``."""
        got = self.line()
        if got != line:
            pytest.fail(f"child {self.pid} said {got!r}, not {line!r}: {self.finish(timeout=10)[1]}")

    def finish(self, timeout: float) -> tuple[str, str]:
        """Everything the child prints on stdout and stderr until it exits; fails the test after ``timeout``."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"child {self.pid} is still running after {timeout:.0f}s")
        return out.decode(), err.decode()

    def outcome(self, timeout: float) -> Any:
        """The JSON the child prints once it is done; fails the test unless it exits with status 0."""
        out, err = self.finish(timeout)
        assert self.proc.returncode == 0, f"child {self.pid} failed ({self.proc.returncode}): {err}"
        return json.loads(out)

    def kill(self) -> None:
        """Kill the child and reap it."""
        if self.running():
            self.proc.kill()
        self.proc.communicate()
