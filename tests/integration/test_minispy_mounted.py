"""The minispy sample on a real mount, read by the minispy command: touch's requests with its pid and path,
three instances attached and detached by the command, JSON output and filters, one reader at a time, unload
ending the reader, and a full buffer's drop notice; the mount keeps working throughout."""

from __future__ import annotations

import errno
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


def _interruptible() -> None:
    """In the child before its exec: Ctrl-C (SIGINT) interrupts it, as it does a command started from a
    terminal, even when these tests run in a shell's background job (which ignores SIGINT, and its children
    inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Stream:
    """A running ``minispy --json --volume MNT ARGV`` and the entries it printed so far."""

    def __init__(self, vol: MountedVolume, *argv: str):
        self.mountpoint = vol.mountpoint
        command = [*COMMAND, "--json", "--volume", vol.mountpoint, *argv]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_interruptible,
        )
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
        """Ctrl-C, and its exit status; it must end without a word on stderr (no traceback)."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=10)
        assert self.stderr() == ""
        return code


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
    mounted.assert_no_errors_logged(start)


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


def test_attach_and_detach_without_an_instance_name_take_the_top_instance(vol: MountedVolume) -> None:
    """The Accept line's ``minispy /a MNT``: the default instance is the Top one; detached, it logs nothing."""
    mnt = vol.mountpoint
    done = minispy("--detach", mnt)
    assert (done.returncode, done.stdout) == (0, f"detached {TOP} from {mnt}\n"), done.stderr
    try:
        assert instances(mnt)[TOP] == ("-", "no")
        before = json.loads(minispy("--stats", "--json", "--volume", mnt).stdout)["sequence"]
        assert not Path(mnt, f"unseen-{uuid.uuid4().hex}").exists()
        assert json.loads(minispy("--stats", "--json", "--volume", mnt).stdout)["sequence"] == before
    finally:
        done = minispy("--attach", mnt)
    assert (done.returncode, done.stdout) == (0, f"attached {TOP} at altitude 385100 to {mnt}\n"), done.stderr
    assert instances(mnt)[TOP] == ("385100", "manual")
    with Stream(vol) as stream:
        stream.sync()  # logged again
        assert stream.stop() == 0
    again = minispy("--attach", mnt)
    assert (again.returncode, again.stderr) == (
        1,
        f"minispy: {mnt}: altitude 385100 is taken by minispy/{TOP} (FLT_INSTANCE_ALTITUDE_COLLISION)\n",
    )


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


def test_failed_requests_carry_the_errno_their_caller_got(vol: MountedVolume) -> None:
    directory = Path(vol.mountpoint, f"errnos-{uuid.uuid4().hex}")
    directory.mkdir()
    (directory / "f").write_text("f\n")
    with Stream(vol) as stream:
        stream.sync()
        rmdir = subprocess.run(["rmdir", str(directory)], capture_output=True, text=True)
        assert rmdir.returncode == 1 and "Directory not empty" in rmdir.stderr
        cat = subprocess.run(["cat", str(directory / "missing")], capture_output=True, text=True)
        assert cat.returncode == 1 and "No such file or directory" in cat.stderr
        with pytest.raises(OSError) as no_attribute:
            os.getxattr(directory / "f", "user.missing")
        assert no_attribute.value.errno == errno.ENODATA
        os.setxattr(directory / "f", "user.set", b"12345")  # a success, for contrast: its arguments
        stream.sync()
        assert stream.stop() == 0

    def outcomes(path: Path, process: str) -> list[tuple[str, str | None, str, str | None]]:
        return [
            (r["major"], r["minor"], r["status"], r["errno"]) for r in stream.records(path) if r["process"] == process
        ]

    assert ("SET_INFORMATION", "DISPOSITION", "DIRECTORY_NOT_EMPTY", "ENOTEMPTY") in outcomes(directory, "rmdir")
    assert outcomes(directory / "missing", "cat") == [("LOOKUP", None, "OBJECT_NAME_NOT_FOUND", "ENOENT")]
    mine = [r for r in stream.records(directory / "f") if r["arguments"].get("name", "").startswith("user.")]
    assert [(r["major"], r["minor"], r["errno"], r["arguments"]) for r in mine] == [
        ("QUERY_EA", "GET", "ENODATA", {"name": "user.missing"}),
        ("SET_EA", "SET", None, {"name": "user.set", "length": 5}),
    ]


def test_a_name_that_is_not_utf8_is_written_as_its_bytes(vol: MountedVolume) -> None:
    """In the table as the file's own bytes, in JSON as Python's surrogate escapes (os.fsencode gives the bytes).

    PYTHONIOENCODING makes the command's stdout strict UTF-8, as a UTF-8 locale such as en_US.UTF-8 does.
    """
    tag = uuid.uuid4().hex
    path = os.path.join(os.fsencode(vol.mountpoint), b"caf\xe9-" + tag.encode())

    def next_create(*argv: str, flags: int) -> bytes:
        """What ``minispy ARGV`` shows of the next CREATE of ``path``, made by an open with ``flags``."""
        command = [*COMMAND, *argv, "--volume", vol.mountpoint, "--op", "CREATE", "--path", tag, "--count", "1"]
        env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
        reader = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(os.open(path, flags, 0o644))
        out, err = reader.communicate(timeout=30)
        assert (reader.returncode, err) == (0, b"")
        return out

    header, row = next_create(flags=os.O_CREAT | os.O_WRONLY).splitlines()
    assert row[header.index(b"NAME") :].startswith(path + b"  disposition=OPEN_IF ")
    record = json.loads(next_create("--json", flags=os.O_RDONLY))
    assert (os.fsencode(record["name"]), record["arguments"]["disposition"]) == (path, "OPEN")


def test_a_closed_output_ends_minispy_quietly(vol: MountedVolume) -> None:
    """``minispy | head -5``: once head has gone, the next line minispy writes ends it, with status 0 and no
    traceback."""
    probe = os.path.join(vol.mountpoint, f"probe-{uuid.uuid4().hex}")
    script = '"$@" | head -5; echo "minispy exited ${PIPESTATUS[0]}" >&2'
    pipeline = subprocess.Popen(
        ["bash", "-c", script, "pipeline", *COMMAND, "--volume", vol.mountpoint, "--path", probe],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while pipeline.poll() is None and time.monotonic() < deadline:
        assert not os.path.exists(probe)  # a LOOKUP each: minispy keeps writing until it finds the pipe closed
        time.sleep(0.02)
    out, err = pipeline.communicate(timeout=10)
    assert err == "minispy exited 0\n"
    assert len(out.splitlines()) == 5 and all(probe in line for line in out.splitlines()[1:])


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


def test_the_command_says_why_it_cannot_start(vol: MountedVolume, scratch: Path) -> None:
    """No volume there, a volume without minispy, two volumes with it and no --volume, not root: one line on
    stderr that says so, status 1, nothing on stdout."""

    def fails(*argv: str, user: int | None = None) -> str:
        done = subprocess.run([*COMMAND, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, user=user)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        return done.stderr

    nowhere = str(scratch)
    for argv in (["--volume", nowhere], ["--stats", "--volume", nowhere], ["--attach", nowhere], ["--list", nowhere]):
        assert fails(*argv) == f"minispy: {nowhere} is not a mounted fltfuse volume\n"
    assert fails("--stats", "--volume", vol.mountpoint, user=65534) == (
        f"minispy: connection refused: only root may connect to MiniSpyPort on {vol.mountpoint}\n"
    )
    with mounted_volume(scratch, size="64M") as plain:
        mnt = plain.mountpoint
        assert fails("--volume", mnt) == (
            f"minispy: no port MiniSpyPort on the volume mounted at {mnt}: is the minispy filter loaded? "
            "(fltfuse mount --filter minispy, or fltmc load minispy MNT)\n"
        )
        assert fails("--attach", mnt) == (
            f"minispy: {mnt}: filter minispy is not loaded (FLT_FILTER_NOT_FOUND); "
            f"load it first: fltmc load minispy {mnt}\n"
        )
        fltmc("load", "minispy", mnt)
        several = fails("--stats")
        assert several.startswith("minispy: MiniSpyPort is on several volumes (")
        assert several.endswith("): name one with --volume MNT\n")
        assert {vol.mountpoint, mnt} <= set(several[several.index("(") + 1 : several.rindex(")")].split(", "))
    assert "Traceback" not in several


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

        for i in range(40):  # full again: this time the table shows it
            assert not os.path.exists(os.path.join(small.mountpoint, f"again-{i}"))
        refilled = json.loads(minispy("--stats", "--json", "--volume", small.mountpoint).stdout)
        table = subprocess.Popen(
            [*COMMAND, "--volume", small.mountpoint, "--count", "21"], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        while table.poll() is None and time.monotonic() < deadline:
            assert not os.path.exists(os.path.join(small.mountpoint, "one-more"))  # logged once it has room
            time.sleep(0.02)
        out, _ = table.communicate(timeout=10)
        final = json.loads(minispy("--stats", "--json", "--volume", small.mountpoint).stdout)
        lines = out.splitlines()
        assert len(lines) >= 1 + 20 + 1 + 1 and lines[0].split()[0] == "SEQ"
        assert all(" LOOKUP " in line and "/again-" in line for line in lines[1:21])
        notice = re.fullmatch(
            r"\*\*\* (\d+) record\(s\) dropped here: the filter's buffer was full \(MaxRecords\) \*\*\*", lines[21]
        )
        assert notice, lines[21]  # the 20 "again-" and the "one-more" that found the buffer full still
        assert refilled["dropped"] - after["dropped"] <= int(notice[1]) <= final["dropped"] - after["dropped"]
        still_works(small.mountpoint, "after-overflow")


def test_a_flood_with_no_reader_is_dropped_and_never_waited_for(scratch: Path) -> None:
    """cp -r of 2000 files while no minispy reads: the copy completes and is right, the buffer holds MaxRecords,
    and every other request was dropped and counted (none waits for room)."""
    tree = scratch / "tree"
    tree.mkdir()
    for i in range(2000):
        (tree / f"f{i:04}").write_bytes(b"%d\n" % i)
    with mounted_volume(
        scratch / "volume", size="64M", filters=("minispy",), parameters={"minispy": {"MaxRecords": "100"}}
    ) as small:
        copy = Path(small.mountpoint, "copy")
        subprocess.run(["cp", "-r", str(tree), str(copy)], check=True, timeout=300)
        stats = json.loads(minispy("--stats", "--json", "--volume", small.mountpoint).stdout)
        assert subprocess.run(["diff", "-r", str(tree), str(copy)], capture_output=True).returncode == 0
    assert stats["buffered"] == stats["capacity"] == stats["logged"] == 100
    assert stats["dropped"] == stats["sequence"] - 100 >= 5 * 2000  # LOOKUP, CREATE, WRITE, CLEANUP, CLOSE a file
