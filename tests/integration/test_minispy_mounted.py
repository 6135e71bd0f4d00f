"""The minispy sample on a real mount, read by the minispy command: touch's requests with its pid and path,
three instances attached and detached by the command, JSON output and filters, one reader at a time, unload
ending the reader, and a full buffer's drop notice; the mount keeps working throughout."""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

ROOT = Path(__file__).resolve().parents[2]
COMMAND = (sys.executable, "-m", "filters.minispy.user")
TOP, MIDDLE, BOTTOM = "Minispy - Top Instance", "Minispy - Middle Instance", "Minispy - Bottom Instance"

Entries = list[dict[str, Any]]


def minispy(*argv: str) -> subprocess.CompletedProcess[str]:
    """The minispy command, to its end."""
    return subprocess.run([*COMMAND, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)


def fltmc(*argv: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fltfuse.fltmc", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


class Stream:
    """A running ``minispy --json --volume MNT ARGV`` and the entries it printed so far."""

    def __init__(self, vol: MountedVolume, *argv: str):
        self.mountpoint = vol.mountpoint
        command = [*COMMAND, "--json", "--volume", vol.mountpoint, *argv]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.entries: Entries = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def until(self, condition: Callable[[Entries], Any], what: str, timeout: float = 30) -> Entries:
        """Read entries until ``condition(entries)`` holds; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition(self.entries):
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"minispy never showed {what}")
            if line is None:
                pytest.fail(f"minispy ended ({self.process.wait()}) before showing {what}: {self.stderr()}")
            self.entries.append(json.loads(line))
        return self.entries

    def sync(self) -> None:
        """Wait until the reader has taken everything logged so far (it logs a lookup made now)."""
        marker = os.path.join(self.mountpoint, f".sync-{uuid.uuid4().hex}")
        assert not os.path.exists(marker)
        self.until(lambda entries: any(e.get("name") == marker for e in entries), "the sync marker")

    def records(self, path: str | Path) -> Entries:
        return [e for e in self.entries if e["type"] == "record" and e["name"] == str(path)]

    def closes(self, path: Path, count: int = 1) -> Callable[[Entries], bool]:
        return lambda _: sum(r["major"] == "CLOSE" for r in self.records(path)) >= count

    def finish(self, timeout: float = 30) -> int:
        """Wait for minispy to end by itself; read what it printed last. Its exit status."""
        code = self.process.wait(timeout=timeout)
        while (line := self._lines.get(timeout=timeout)) is not None:
            self.entries.append(json.loads(line))
        return code

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read() if self.process.poll() is not None else ""

    def stop(self) -> int:
        """Ctrl-C, and its exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("minispy", numbered=True)
    with mounted_volume(directory, size="128M", filters=("minispy",)) as mounted:
        yield mounted


@pytest.fixture(autouse=True)
def clean_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """The daemons log no error or traceback during the test."""
    if "vol" not in request.fixturenames:
        yield
        return
    mounted: MountedVolume = request.getfixturevalue("vol")
    start = len(mounted.log_text())
    yield
    bad = [line for line in mounted.log_text()[start:].splitlines() if re.search(r" (ERROR|CRITICAL) |Traceback", line)]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad)


def still_works(mountpoint: str, name: str) -> None:
    path = Path(mountpoint, name)
    path.write_text(f"{name} works\n")
    assert subprocess.run(["cat", str(path)], capture_output=True, text=True, check=True).stdout == f"{name} works\n"


def instances(mountpoint: str) -> dict[str, tuple[str, str]]:
    """``minispy --list MNT``: instance name -> (altitude, how attached)."""
    done = minispy("--list", mountpoint)
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines()[2:]:
        volume, name, altitude, attached = re.split(r"\s{2,}", line.strip())
        assert volume == mountpoint
        rows[name] = (altitude, attached)
    return rows


# -- what a request looks like ----------------------------------------------------------------------


def test_touch_is_logged_with_its_pid_and_path(vol: MountedVolume) -> None:
    target = Path(vol.mountpoint, "touched")
    with Stream(vol) as stream:
        stream.sync()
        touch = subprocess.Popen(["touch", str(target)])
        assert touch.wait(timeout=30) == 0
        stream.until(stream.closes(target), "the CLOSE of touched")
        assert stream.stop() == 0
    records = stream.records(target)
    majors = [r["major"] for r in records]
    wanted = iter(majors)
    assert all(major in wanted for major in ["CREATE", "SET_INFORMATION", "CLEANUP", "CLOSE"]), majors
    assert {(r["pid"], r["tid"], r["process"]) for r in records} == {(touch.pid, touch.pid, "touch")}
    assert {r["instance"] for r in records} == {TOP}
    create = next(r for r in records if r["major"] == "CREATE")
    assert create["arguments"]["disposition"] == "OPEN_IF" and "O_CREAT" in create["arguments"]["flags"]
    set_times = next(r for r in records if r["major"] == "SET_INFORMATION")
    assert set_times["minor"] == "BASIC" and {"atime_ns", "mtime_ns"} <= set_times["arguments"].keys()
    assert all(r["status"] == "SUCCESS" for r in records if r["major"] != "LOOKUP")
    still_works(vol.mountpoint, "after-touch")


# -- three instances ------------------------------------------------------------------------------


def test_three_instances_log_each_request_top_down_then_bottom_up_and_detach_takes_only_one(
    vol: MountedVolume,
) -> None:
    mnt = vol.mountpoint
    done = minispy("--attach", mnt, "--instance", "middle")
    assert (done.returncode, done.stdout) == (0, f"attached {MIDDLE} at altitude 370000 to {mnt}\n"), done.stderr
    assert minispy("--attach", mnt, "--instance", BOTTOM).returncode == 0
    try:
        assert instances(mnt) == {TOP: ("385100", "mount"), MIDDLE: ("370000", "manual"), BOTTOM: ("361000", "manual")}
        target = Path(mnt, "three")
        with Stream(vol) as stream:
            stream.sync()
            subprocess.run(["touch", str(target)], check=True)
            stream.until(stream.closes(target, 3), "three CLOSEs of three")
            assert stream.stop() == 0
        records = stream.records(target)
        order = {id(r): i for i, r in enumerate(stream.entries)}  # the log order: the order of the posts
        by_seq = {r["seq"]: r for r in records}
        tops = [r for r in records if r["instance"] == TOP]
        assert len(records) == 3 * len(tops) and {r["major"] for r in tops} >= {"CREATE", "CLEANUP", "CLOSE"}
        for top in tops:
            middle, bottom = by_seq[top["seq"] + 1], by_seq[top["seq"] + 2]  # the pre order: top, middle, bottom
            assert (middle["instance"], bottom["instance"]) == (MIDDLE, BOTTOM)
            assert len({(r["major"], r["minor"], r["status"]) for r in (top, middle, bottom)}) == 1
            assert top["pre_time"] < middle["pre_time"] < bottom["pre_time"]
            assert bottom["post_time"] < middle["post_time"] < top["post_time"]
            assert order[id(bottom)] < order[id(middle)] < order[id(top)]

        done = minispy("--detach", mnt, "--instance", "Middle")
        assert (done.returncode, done.stdout) == (0, f"detached {MIDDLE} from {mnt}\n"), done.stderr
        assert instances(mnt) == {TOP: ("385100", "mount"), MIDDLE: ("-", "no"), BOTTOM: ("361000", "manual")}
        target = Path(mnt, "two")
        with Stream(vol) as stream:
            stream.sync()
            subprocess.run(["touch", str(target)], check=True)
            stream.until(stream.closes(target, 2), "two CLOSEs of two")
            assert stream.stop() == 0
        counts = Counter((r["major"], r["minor"], r["instance"]) for r in stream.records(target))
        assert {instance for _, _, instance in counts} == {TOP, BOTTOM}
        for (major, minor, _), n in counts.items():
            assert counts[major, minor, TOP] == counts[major, minor, BOTTOM] == n
    finally:
        for name in (MIDDLE, BOTTOM):
            minispy("--detach", mnt, "--instance", name)  # whichever the test left attached
    assert instances(mnt)[TOP] == ("385100", "mount")
    done = minispy("--detach", mnt, "--instance", "middle")
    assert done.returncode == 1 and "FLT_INSTANCE_NOT_FOUND" in done.stderr
    still_works(mnt, "after-three")


# -- the command's output and filters ---------------------------------------------------------------


def test_json_lines_and_the_table_show_only_what_the_filters_pass(vol: MountedVolume) -> None:
    directory = Path(vol.mountpoint, "filtered")
    directory.mkdir()
    (directory / "a.txt").write_text("a\n")
    (directory / "b.log").write_text("b\n")

    with Stream(vol, "--op", "create", "--process", "cat", "--path", "*/filtered/*.txt", "--count", "1") as stream:
        for name in ("b.log", "a.txt"):
            subprocess.run(["cat", str(directory / name)], check=True, capture_output=True)
        assert stream.finish() == 0  # it stops by itself after one record
    assert len(stream.entries) == 1
    record = stream.entries[0]
    assert (record["major"], record["process"], record["name"]) == ("CREATE", "cat", str(directory / "a.txt"))
    assert record["arguments"]["disposition"] == "OPEN" and record["status"] == "SUCCESS"

    probe = directory / f"probe-{uuid.uuid4().hex}"
    with Stream(vol, "--pid", str(os.getpid()), "--op", "LOOKUP", "--path", probe.name, "--count", "1") as stream:
        assert not probe.exists()
        assert stream.finish() == 0
    assert [(e["major"], e["pid"], e["errno"]) for e in stream.entries] == [("LOOKUP", os.getpid(), "ENOENT")]

    table = subprocess.Popen(
        [*COMMAND, "--volume", vol.mountpoint, "--process", "cat", "--op", "CREATE", "--path", "a.txt", "--count", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    subprocess.run(["cat", str(directory / "a.txt")], check=True, capture_output=True)
    out, _ = table.communicate(timeout=30)
    header, row = out.splitlines()
    assert header.split() == [
        "SEQ",
        "INST",
        "TIME",
        "USEC",
        "PID",
        "PROCESS",
        "OPERATION",
        "STATUS",
        "NAME",
        "ARGUMENTS",
    ]
    assert row.split()[1] == "Top" and row.split()[5] == "cat"
    assert row[header.index("NAME") :].startswith(vol.mountpoint + "/filtered/a.txt")


# -- the port -------------------------------------------------------------------------------------


def test_a_second_minispy_is_refused_while_one_is_connected(vol: MountedVolume, wait_for: Callable[..., Any]) -> None:
    with Stream(vol) as stream:
        stream.sync()  # connected
        second = minispy("--stats", "--volume", vol.mountpoint)
        assert second.returncode == 1
        assert "connection refused: another minispy is already connected to MiniSpyPort on" in second.stderr
        assert stream.stop() == 0
    stats = wait_for(
        lambda: minispy("--stats", "--json", "--volume", vol.mountpoint).stdout, "minispy --stats once the first left"
    )
    assert json.loads(stats)["capacity"] == 10_000


def test_unloading_the_filter_ends_minispy_with_a_message_and_the_mount_goes_on(vol: MountedVolume) -> None:
    mnt = vol.mountpoint
    with Stream(vol) as stream:
        stream.sync()
        fltmc("unload", "minispy", mnt)
        assert stream.process.wait(timeout=10) == 3
        assert "minispy: disconnected: the minispy filter was unloaded or its volume unmounted" in stream.stderr()
    still_works(mnt, "after-unload")
    gone = minispy("--stats", "--volume", mnt)
    assert (
        gone.returncode == 1
        and "no port MiniSpyPort on" in gone.stderr
        and "is the minispy filter loaded?" in gone.stderr
    )
    assert instances(mnt) == {name: ("-", "no (filter not loaded)") for name in (TOP, MIDDLE, BOTTOM)}

    fltmc("load", "minispy", mnt)
    assert instances(mnt)[TOP] == ("385100", "automatic")
    with Stream(vol) as stream:
        stream.sync()
        assert stream.stop() == 0
    still_works(mnt, "after-reload")


def test_a_full_buffer_drops_records_and_the_reader_is_told_how_many(scratch: Path) -> None:
    with mounted_volume(
        scratch, size="64M", filters=("minispy",), parameters={"minispy": {"MaxRecords": "20"}}
    ) as small:
        for i in range(40):
            assert not os.path.exists(os.path.join(small.mountpoint, f"nothing-{i}"))
        before = json.loads(minispy("--stats", "--json", "--volume", small.mountpoint).stdout)
        assert before["buffered"] == 20 and before["dropped"] >= 20

        with Stream(small) as stream:
            stream.until(lambda entries: any(e["type"] == "dropped" for e in entries), "a drop notice")
            assert stream.stop() == 0
        records = list(itertools.takewhile(lambda e: e["type"] == "record", stream.entries))
        notice = stream.entries[len(records)]
        assert [r["seq"] for r in records] == list(range(1, 21))  # the oldest are kept

        after = json.loads(minispy("--stats", "--json", "--volume", small.mountpoint).stdout)
        assert notice["count"] == after["dropped"] >= before["dropped"]
        still_works(small.mountpoint, "after-overflow")
