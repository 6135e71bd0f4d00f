"""File names on a real mount: what a filter is given after ordinary tools move, link and remove files.

The helper filter ``namestest_recorder`` (in ``names_filters/``) logs the normalized and opened
name of every open, and the source and destination of every rename, in the daemon's log; each
test runs commands (cat, mv, ln, rm) and reads the names given for each command's own requests
(by its pid). The kernel caches names here as it does on any mount: an open of a name it already
resolved sends no LOOKUP, and the filter still gets the right name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

FILTER_PATH = (str(Path(__file__).resolve().parent / "names_filters" / "inf"),)
RECORD = re.compile(r"namestest (\{.*\})$")


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("names", numbered=True)
    with mounted_volume(directory, size="128M", filters=("namestest_recorder",), filter_path=FILTER_PATH) as mounted:
        yield mounted


@pytest.fixture(autouse=True)
def clean_log(vol: MountedVolume) -> Iterator[None]:
    """The daemon logs no error or traceback during the test."""
    start = len(vol.log_text())
    yield
    vol.assert_no_errors_logged(start)


@pytest.fixture
def here(vol: MountedVolume, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the mount for one test."""
    path = Path(vol.mountpoint) / request.node.name
    path.mkdir()
    return path


def records(vol: MountedVolume, pid: int | None = None) -> list[dict[str, Any]]:
    """What the filter logged (for the requests of ``pid``), in order."""
    found = []
    for line in vol.log_text().splitlines():
        match = RECORD.search(line)
        if match:
            record = json.loads(match.group(1))
            if pid is None or record["pid"] == pid:
                found.append(record)
    return found


def command(
    vol: MountedVolume, wait_for: Callable[..., Any], *argv: str | Path, cwd: Path | None = None, logs: bool = True
) -> list[dict[str, Any]]:
    """Run ``argv`` to its end (it must succeed); what the filter logged for it (waited for unless not ``logs``)."""
    process = subprocess.Popen([os.fspath(a) for a in argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, f"{argv} exited {process.returncode}: {err.decode(errors='replace')}"
    if not logs:
        return records(vol, process.pid)
    found: list[dict[str, Any]] = wait_for(lambda: records(vol, process.pid), f"the filter's log lines for {argv}")
    return found


def opened(vol: MountedVolume, wait_for: Callable[..., Any], path: Path, cwd: Path | None = None) -> dict[str, Any]:
    """``cat path``: the names the filter was given for its open."""
    (record,) = [r for r in command(vol, wait_for, "cat", path, cwd=cwd) if r["op"] == "CREATE"]
    return record


def test_a_moved_file_is_named_by_its_new_name_and_never_the_old_one(
    vol: MountedVolume, wait_for: Callable[..., Any], here: Path
) -> None:
    (here / "a").mkdir()
    (here / "c").mkdir()
    (here / "a" / "b").write_text("moved\n")
    old, new = str(here / "a" / "b"), str(here / "c" / "d")
    record = opened(vol, wait_for, here / "a" / "b")
    assert (record["normalized"], record["opened"]) == (old, old)

    (rename,) = command(vol, wait_for, "mv", here / "a" / "b", here / "c" / "d")
    assert (rename["op"], rename["normalized"], rename["destination"]) == ("RENAME", old, new)
    start = len(records(vol))
    for path, cwd in ((here / "c" / "d", None), (Path("d"), here / "c")):
        record = opened(vol, wait_for, path, cwd)
        assert (record["normalized"], record["opened"]) == (new, new)
    (unlink,) = command(vol, wait_for, "rm", here / "c" / "d")
    assert (unlink["op"], unlink["normalized"]) == ("UNLINK", new)
    after = records(vol)[start:]
    assert not [r for r in after if old in r.values()], after


@pytest.mark.parametrize("link", ["k/y", "h/z"], ids=["other-directory", "same-directory"])
def test_a_hard_link_is_the_opened_name_of_an_open_through_it(
    vol: MountedVolume, wait_for: Callable[..., Any], here: Path, link: str
) -> None:
    (here / "h").mkdir()
    (here / "k").mkdir()
    (here / "h" / "x").write_text("linked\n")  # the kernel caches this name (the file has one)
    x, y = str(here / "h" / "x"), str(here / link)
    command(vol, wait_for, "ln", x, y, logs=False)
    # Through the new link first, so that the file's normalized name is first worked out from it; then
    # through h/x, which the kernel cached before the link was made.
    for path in (y, x, y, x):
        record = opened(vol, wait_for, Path(path))
        assert record["opened"] == path, record
        assert record["normalized"] in (x, y), record
    # One link removed: no name given afterwards is the removed one.
    (unlink,) = command(vol, wait_for, "rm", x)
    assert (unlink["op"], unlink["normalized"]) == ("UNLINK", x)
    start = len(records(vol))
    for _ in range(2):
        record = opened(vol, wait_for, Path(y))
        assert (record["normalized"], record["opened"]) == (y, y)
    assert not [r for r in records(vol)[start:] if x in r.values()]


def test_a_file_under_a_moved_directory_is_named_by_the_new_path(
    vol: MountedVolume, wait_for: Callable[..., Any], here: Path
) -> None:
    (here / "top" / "sub").mkdir(parents=True)
    (here / "top" / "sub" / "f").write_text("deep\n")
    old_top, new_top = str(here / "top"), str(here / "moved")
    record = opened(vol, wait_for, here / "top" / "sub" / "f")
    assert (record["normalized"], record["opened"]) == (f"{old_top}/sub/f", f"{old_top}/sub/f")
    start = len(records(vol))

    (rename,) = command(vol, wait_for, "mv", old_top, new_top)
    assert (rename["op"], rename["normalized"], rename["destination"]) == ("RENAME", old_top, new_top)
    for path, cwd in ((here / "moved" / "sub" / "f", None), (Path("f"), here / "moved" / "sub")):
        record = opened(vol, wait_for, path, cwd)
        assert (record["normalized"], record["opened"]) == (f"{new_top}/sub/f", f"{new_top}/sub/f")
    listing = [r for r in command(vol, wait_for, "ls", here / "moved" / "sub") if r["op"] == "CREATE"]
    assert [r["normalized"] for r in listing] == [f"{new_top}/sub"]
    after = records(vol)[start:]
    assert not [r for r in after for v in r.values() if isinstance(v, str) and v.startswith(old_top + "/")], after
