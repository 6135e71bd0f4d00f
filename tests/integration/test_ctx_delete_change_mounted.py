"""The ctx, delete and change samples on real mounts, driven with ordinary tools (sh, cat, cp, mv, rm, rmdir, ln,
truncate, getfattr); the kernel's own forget (``echo 2 > /proc/sys/vm/drop_caches``) ends file contexts."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

CTX_CLEANUP = re.compile(r" ctx: (INSTANCE|FILE|STREAM|STREAM_HANDLE) context cleanup (\{.*\})$")
DELETED = re.compile(r" delete: deleted (\{.*\})$")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def mount(tmp_path_factory: pytest.TempPathFactory, filter_name: str) -> Iterator[MountedVolume]:
    with mounted_volume(tmp_path_factory.mktemp(filter_name), size="128M", filters=(filter_name,)) as vol:
        yield vol


@pytest.fixture(scope="module")
def ctx_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    yield from mount(tmp_path_factory, "ctx")


@pytest.fixture(scope="module")
def delete_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    yield from mount(tmp_path_factory, "delete")


@pytest.fixture(scope="module")
def change_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    yield from mount(tmp_path_factory, "change")


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Callable[[MountedVolume], Path]]:
    """``workdir(vol)``: a fresh directory on the mount; the test fails if the daemon logs an error meanwhile."""
    made: list[tuple[MountedVolume, int]] = []

    def make(vol: MountedVolume) -> Path:
        made.append((vol, len(vol.log_text())))
        path = Path(vol.mountpoint) / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        path.mkdir()
        return path

    yield make
    for vol, start in made:
        vol.assert_no_errors_logged(start)


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with sh in ``cwd``; fail the test if it fails."""
    done = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done


def after_forget(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Make the kernel forget the inodes nothing uses (drop_caches) until ``condition()`` is true; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        DROP_CACHES.write_text("2")
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def ctx_reports(vol: MountedVolume, kind: str, under: Path | None = None) -> list[dict[str, Any]]:
    """ctx's cleanup reports of contexts of type ``kind`` (for files under ``under``), in log order."""
    found = []
    for line in vol.log_text().splitlines():
        match = CTX_CLEANUP.search(line)
        if match and match.group(1) == kind:
            report = json.loads(match.group(2))
            if under is None or report.get("name", "").startswith(f"{under}/"):
                found.append(report)
    return found


def deletions(vol: MountedVolume, under: Path) -> list[tuple[str, str]]:
    """(kind, name relative to ``under``) of each deletion delete reported under ``under``, in log order."""
    found = []
    for line in vol.log_text().splitlines():
        match = DELETED.search(line)
        if match:
            report = json.loads(match.group(1))
            if report["name"].startswith(f"{under}/"):
                found.append((report["kind"], report["name"][len(f"{under}/") :]))
    return found


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return value


# -- ctx ------------------------------------------------------------------------------------------------


def test_ctx_counts_a_file_through_tools_follows_mv_and_cleans_up_when_the_kernel_forgets_it(
    ctx_volume: MountedVolume, workdir: Callable[[MountedVolume], Path]
) -> None:
    here = workdir(ctx_volume)
    fd = os.open(here / "f", os.O_RDONLY | os.O_CREAT, 0o644)  # held throughout: the inode stays cached
    try:
        sh("echo hello > f", here)  # one open, one write of 6 bytes
        assert sh("cat f", here).stdout == "hello\n"
        sh("mv f g", here)
    finally:
        os.close(fd)

    def three_handle_reports() -> list[dict[str, Any]] | None:
        reports = ctx_reports(ctx_volume, "STREAM_HANDLE", here)
        return reports if len(reports) == 3 else None

    handles = wait_until(three_handle_reports, "the three handle contexts' cleanups (each at its handle's release)")
    assert [h["name"] for h in handles] == [f"{here}/f"] * 3  # the name each was opened by
    assert sorted(h["bytes_written"] for h in handles) == [0, 0, 6]  # echo's handle wrote; ours and cat's did not
    (stream,) = after_forget(lambda: ctx_reports(ctx_volume, "STREAM", here), "the stream context's cleanup")
    assert stream["name"] == f"{here}/g"  # renamed by mv while the stream context lived
    assert (stream["opens"], stream["closes"], stream["writes"], stream["bytes_written"]) == (3, 3, 1, 6)
    assert stream["cleanups"] >= 3  # one per close(2) of each descriptor (a fork's copies too)
    (file,) = ctx_reports(ctx_volume, "FILE", here)
    assert (file["name"], file["handles"]) == (f"{here}/f", 0)
    assert os.path.exists(here / "g")  # forgotten is not deleted: the file is still there
    assert ctx_reports(ctx_volume, "INSTANCE") == []  # cleaned up on forget, long before the unmount


def test_ctx_every_cleanup_runs_once_and_detach_cleans_up_the_instance_context_last(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with mounted_volume(tmp_path_factory.mktemp("ctx-detach"), size="128M", filters=("ctx",)) as vol:
        root = Path(vol.mountpoint)
        sh("mkdir src && for i in 1 2 3; do echo $i > src/$i; done && cp -r src dst && cat dst/* > all", root)
        sh("mv dst moved && truncate -s 1 all && rm src/1 && ls -l moved > /dev/null", root)
        held = os.open(root / "all", os.O_RDONLY)  # still open at the detach
        try:
            after_forget(lambda: ctx_reports(vol, "STREAM", root / "src"), "a cleanup on forget")
            subprocess.run(
                [sys.executable, "-m", "fltfuse.fltmc", "detach", "ctx", vol.mountpoint],
                check=True,
                capture_output=True,
                timeout=60,
            )
            (instance,) = wait_until(lambda: ctx_reports(vol, "INSTANCE"), "the instance context's cleanup")
            assert os.read(held, 10) == b"1"  # the volume goes on without the filter
        finally:
            os.close(held)
        at_detach = vol.log_text()
    assert vol.log_text().count(" ctx: ") == at_detach.count(" ctx: ")  # nothing cleaned up again at unmount
    last = [line for line in at_detach.splitlines() if " ctx: " in line][-1]
    assert " ctx: INSTANCE context cleanup " in last  # every other context referenced it
    assert instance["allocated"] == instance["cleaned"]
    assert set(instance["allocated"]) == {"FILE", "STREAM", "STREAM_HANDLE"}
    serials: list[int] = []
    for kind, allocated in instance["allocated"].items():
        reports = ctx_reports(vol, kind)
        assert len(reports) == allocated, kind
        serials += [r["serial"] for r in reports]
    assert len(serials) == len(set(serials))  # each context cleaned up exactly once
    assert instance["totals"]["opens"] == instance["allocated"]["STREAM_HANDLE"]


# -- delete ---------------------------------------------------------------------------------------------


def sentinel(vol: MountedVolume, here: Path) -> None:
    """Delete a file and wait for its report: whatever was to be reported before it is by then."""
    sh("echo > sentinel && rm sentinel", here)
    after_forget(lambda: ("file", "sentinel") in deletions(vol, here), "the sentinel's deletion")


def test_delete_reports_rm_rmdir_and_the_target_of_mv_once(
    delete_volume: MountedVolume, workdir: Callable[[MountedVolume], Path]
) -> None:
    here = workdir(delete_volume)
    sh("echo a > f && echo b > g && echo c > h && mkdir d && echo e > d/e", here)
    sh("rm f && rm d/e && rmdir d && mv g h", here)
    assert sh("cat h", here).stdout == "b\n"
    sentinel(delete_volume, here)
    assert sorted(deletions(delete_volume, here)) == [
        ("directory", "d"),
        ("file", "d/e"),
        ("file", "f"),
        ("file", "h"),  # the h that mv replaced
        ("file", "sentinel"),
    ]


def test_delete_reports_an_open_file_at_its_last_close_and_a_linked_file_when_its_last_link_goes(
    delete_volume: MountedVolume, workdir: Callable[[MountedVolume], Path]
) -> None:
    here = workdir(delete_volume)
    sh("echo data > open && echo data > linked && ln linked other", here)
    fd = os.open(here / "open", os.O_RDONLY)
    try:
        sh("rm open && rm linked", here)
        assert os.read(fd, 10) == b"data\n"  # the data lives until the last handle goes
        sentinel(delete_volume, here)
        assert deletions(delete_volume, here) == [("file", "sentinel")]
    finally:
        os.close(fd)
    wait_until(lambda: ("file", "open") in deletions(delete_volume, here), "the report at the last close")
    sh("rm other", here)
    after_forget(lambda: ("file", "other") in deletions(delete_volume, here), "the last link's deletion")
    assert deletions(delete_volume, here) == [("file", "sentinel"), ("file", "open"), ("file", "other")]


def test_delete_reports_eight_parallel_unlinks_once_and_failures_never(
    delete_volume: MountedVolume, workdir: Callable[[MountedVolume], Path]
) -> None:
    here = workdir(delete_volume)
    sh("echo x > target && mkdir full && echo y > full/inside && mkdir dir", here)
    start = threading.Barrier(8)
    outcomes: list[int] = []

    def unlink() -> None:
        start.wait()
        try:
            os.unlink(here / "target")
            outcomes.append(0)
        except OSError as exc:
            outcomes.append(exc.errno or 0)

    threads = [threading.Thread(target=unlink) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == [0] + [errno.ENOENT] * 7
    failures = [
        (["rm", "missing"], "No such file or directory"),
        (["rmdir", "full"], "Directory not empty"),
        ([sys.executable, "-c", "import os; os.unlink('dir')"], "Is a directory"),
    ]
    for argv, message in failures:
        done = subprocess.run(argv, cwd=here, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr, (argv, done.stderr)
    sentinel(delete_volume, here)
    assert deletions(delete_volume, here) == [("file", "target"), ("file", "sentinel")]


# -- change ---------------------------------------------------------------------------------------------


def state(path: Path) -> str:
    """What getfattr says of ``path``'s user.fltfuse.change."""
    done = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.fltfuse.change", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_change_marks_what_tools_modify_and_forgets_it_with_the_inode(
    change_volume: MountedVolume, workdir: Callable[[MountedVolume], Path]
) -> None:
    here = workdir(change_volume)
    backing = Path(change_volume.backing) / here.relative_to(change_volume.mountpoint)
    for name in ("read", "truncated", "appended", "source", "copy"):
        (backing / name).write_text(f"{name}\n")  # made behind the volume: the filter has seen nothing of them
    # Every file stays open in the shell (descriptors 3 to 8), so its inode stays cached throughout.
    script = """
        exec 3<read 4<truncated 5<appended 6<source 7<copy
        cat read > /dev/null
        truncate -s 2 truncated
        echo more >> appended
        cp source copy
        mv copy copied
        exec 8>new; echo fresh >&8
        cat truncated appended copied new > /dev/null
        for f in read source truncated appended copied new; do
            echo "$f $(getfattr --only-values -n user.fltfuse.change $f)"
        done
    """
    states = dict(line.split() for line in sh(script, here).stdout.splitlines())
    assert states == {
        "read": "clean",  # read only
        "source": "clean",  # cp's source
        "truncated": "dirty",  # still dirty after cat reopened it
        "appended": "dirty",
        "copied": "dirty",  # cp's destination, renamed: the state is the file's
        "new": "dirty",  # made by the shell's redirection
    }
    after_forget(lambda: state(here / "truncated") == "clean", "the state to go with the forgotten inode")
    assert sh("cat truncated", here).stdout == "tr"
    sh("setfattr -n user.other -v kept truncated", here)  # other attributes pass through
    assert sh("getfattr --only-values -n user.other truncated", here).stdout == "kept"
