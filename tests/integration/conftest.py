"""Fixtures for the mounted integration tier.

* ``run``: runs a command (list of arguments), fails the test with the
  command's output when it exits non-zero, and never hangs the suite.
* ``scratch``: a fresh directory under /var/tmp (on local disk, traversable by
  other users), removed afterwards, but only once nothing is mounted inside it
  and no loop device uses a file in it.
* ``wait_for``: polls a condition with a deadline (instead of sleeping).
* ``mount_table``: /proc/self/mounts as (source, target, fstype, options).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse.testing import why_no_mount


def _run(
    *argv: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [os.fspath(a) for a in argv]
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, input=input, errors="replace"
    )
    if check and done.returncode != 0:
        command = " ".join(args)
        pytest.fail(
            f"{command} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )
    return done


@pytest.fixture
def run() -> Callable[..., subprocess.CompletedProcess[str]]:
    return _run


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    return _wait_for


def proc_mounts() -> list[tuple[str, str, str, list[str]]]:
    """(source, target, fstype, options) of every mount, read from /proc/self/mounts (never stats a mount)."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            source, target, fstype, options = (
                re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field) for field in line.split()[:4]
            )
            out.append((source, target, fstype, options.split(",")))
    return out


@pytest.fixture
def mount_table() -> Callable[[], list[tuple[str, str, str, list[str]]]]:
    return proc_mounts


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below ``directory``."""
    prefix = os.path.realpath(directory)
    return [target for _, target, _, _ in proc_mounts() if target == prefix or target.startswith(prefix + "/")]


def attached_images_below(directory: Path) -> list[str]:
    """Loop devices whose backing file is below ``directory``."""
    listing = subprocess.run(
        ["losetup", "--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    ).stdout
    prefix = os.path.realpath(directory) + "/"
    return [line for line in listing.splitlines() if line.partition(" ")[2].startswith(prefix)]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh directory on local disk, mode 0755 so that other users can reach mounts in it."""
    reason = why_no_mount()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="fltfuse-it-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    left = mounts_below(path) + attached_images_below(path)
    # Never rmtree into a live mount or under an attached loop device: leave the directory and say so.
    assert not left, f"still in use below {path}: {left}"
    shutil.rmtree(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Record each phase's report on the item, so fixtures can tell whether the test passed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
