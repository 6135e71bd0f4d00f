"""The namechanger and simrep samples on real mounts, driven with ordinary tools.

namechanger grafts real/dir at other/place; two small filters generated here
(namewatch_above at 380000, namewatch_below at 360500) log the names they get
for each file opened, on either side of it (370120). simrep resolves names in
old in new, with RemapRenamesAndLinks 1.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

Run = Callable[..., subprocess.CompletedProcess[str]]

NAMEWATCH = '''\
"""namewatch: logs the normalized and opened names it gets in post-CREATE of a regular file."""

import logging

from fltfuse import (
    FileType, FilterRegistration, MajorFunction, NameFormat, NtStatus, OperationRegistration,
    PostopCallbackStatus, PostopFlags, get_file_name_information,
)

log = logging.getLogger("namewatch")


def post_create(cbd, objects, context, flags):
    p = cbd.iopb.parameters
    opened_file = cbd.io_status.status == NtStatus.SUCCESS and p.file_type is FileType.REGULAR
    if opened_file and not flags & PostopFlags.DRAINING:
        normalized = get_file_name_information(cbd, objects, NameFormat.NORMALIZED).name
        opened = get_file_name_information(cbd, objects, NameFormat.OPENED).name
        log.info("namewatch %s: %s opened as %s", objects.filter.name, normalized, opened)
    return PostopCallbackStatus.FINISHED_PROCESSING


REGISTRATION = FilterRegistration(operations=(OperationRegistration(MajorFunction.CREATE, post=post_create),))
'''

NAMEWATCH_INF = """\
[Version]
Signature   = "$Windows NT$"
Class       = "ActivityMonitor"
ClassGuid   = {{b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}}
Provider    = "fltfuse tests"
DriverVer   = 11/21/2026,1.0.0.0

[DefaultInstall.NTamd64.Services]
AddService  = {name},,Test.Service

[Test.Service]
DisplayName    = "{name}"
ServiceBinary  = namewatch
Dependencies   = "FltMgr"
ServiceType    = 2
StartType      = 3
ErrorControl   = 1
LoadOrderGroup = "FSFilter Activity Monitor"
AddReg         = Test.AddRegistry

[Test.AddRegistry]
HKR,"Parameters\\Instances","DefaultInstance",0x00000000,"{name} Instance"
HKR,"Parameters\\Instances\\{name} Instance","Altitude",0x00000000,"{altitude}"
HKR,"Parameters\\Instances\\{name} Instance","Flags",0x00010001,0x0
"""


def clean_log(vol: MountedVolume) -> Iterator[MountedVolume]:
    """Yield ``vol``; then fail if its daemon logged an error or a traceback meanwhile."""
    start = len(vol.log_text())
    yield vol
    vol.assert_no_errors_logged(start)


def fails(run: Run, *argv: str, cwd: str) -> str:
    """Run a command that must fail; its error output."""
    done = run(*argv, cwd=cwd, check=False)
    assert done.returncode != 0, f"{' '.join(argv)} succeeded"
    return done.stderr


# -- namechanger ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graft_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("namechanger", numbered=True)
    watch = directory / "namewatch"
    (watch / "inf").mkdir(parents=True)
    (watch / "namewatch.py").write_text(NAMEWATCH)
    for name, altitude in (("namewatch_above", "380000"), ("namewatch_below", "360500")):
        (watch / "inf" / f"{name}.inf").write_text(NAMEWATCH_INF.format(name=name, altitude=altitude))
    with mounted_volume(
        directory,
        size="64M",
        filters=("namechanger", "namewatch_above", "namewatch_below"),
        filter_path=(str(watch / "inf"),),
        parameters={"namechanger": {"RealMapping": "real/dir", "UserMapping": "other/place"}},
    ) as vol:
        root = Path(vol.mountpoint)
        (root / "real").mkdir()
        (root / "other").mkdir()
        (root / "other" / "place").mkdir()  # makes real/dir
        (root / "other" / "place" / "f").write_bytes(b"grafted\n")
        yield vol


@pytest.fixture
def graft(graft_mount: MountedVolume) -> Iterator[MountedVolume]:
    yield from clean_log(graft_mount)


def test_tools_see_the_real_directory_at_its_user_place_only(graft: MountedVolume, run: Run) -> None:
    mnt, backing = graft.mountpoint, Path(graft.backing)
    assert (backing / "real" / "dir" / "f").read_bytes() == b"grafted\n"  # made through other/place
    assert os.listdir(backing / "other") == []
    assert run("ls", "other", cwd=mnt).stdout.split() == ["place"]
    assert run("ls", "-A", "real", cwd=mnt).stdout.split() == []
    assert run("cat", "other/place/f", cwd=mnt).stdout == "grafted\n"
    assert "No such file or directory" in fails(run, "ls", "real/dir", cwd=mnt)
    assert "No such file or directory" in fails(run, "stat", "real/dir/f", cwd=mnt)
    assert run("realpath", "other/place/f", cwd=mnt).stdout.strip() == f"{mnt}/other/place/f"
    assert run("sh", "-c", "cd other/place && pwd -P", cwd=mnt).stdout.strip() == f"{mnt}/other/place"
    assert run("sh", "-c", "cd other/place && realpath .", cwd=mnt).stdout.strip() == f"{mnt}/other/place"
    # the graft's own entry and its .. carry the right inodes
    inodes = dict(line.split()[::-1] for line in run("ls", "-ai", "other/place", cwd=mnt).stdout.splitlines())
    assert inodes["."] == run("stat", "-c", "%i", "other/place", cwd=mnt).stdout.strip()
    assert inodes["."] == str(os.stat(backing / "real" / "dir").st_ino)
    assert inodes[".."] == run("stat", "-c", "%i", "other", cwd=mnt).stdout.strip()
    found = run("find", ".", "-path", "./lost+found", "-prune", "-o", "-print", cwd=mnt).stdout.split()
    assert sorted(found) == [".", "./other", "./other/place", "./other/place/f", "./real"]


def test_files_are_made_copied_moved_and_removed_through_the_graft(graft: MountedVolume, run: Run) -> None:
    mnt, real = graft.mountpoint, Path(graft.backing) / "real" / "dir"
    run("cp", "other/place/f", "other/place/copy", cwd=mnt)
    run("mkdir", "other/place/tree", cwd=mnt)
    run("sh", "-c", "echo one > other/place/tree/one && echo two >> other/place/tree/one", cwd=mnt)
    run("cp", "-r", "other/place/tree", "other/place/tree2", cwd=mnt)
    run("mv", "other/place/copy", "other/place/tree2/moved", cwd=mnt)
    assert (real / "tree2" / "one").read_text() == "one\ntwo\n"
    assert (real / "tree2" / "moved").read_bytes() == b"grafted\n"
    assert run("cat", "other/place/tree2/one", cwd=mnt).stdout == "one\ntwo\n"
    run("mv", "other/place/tree2/moved", "outside", cwd=mnt)  # out of the graft, and back
    run("mv", "outside", "other/place/back", cwd=mnt)
    assert (real / "back").exists() and not (Path(graft.backing) / "outside").exists()
    run("rm", "-r", "other/place/tree", "other/place/tree2", "other/place/back", cwd=mnt)
    assert sorted(os.listdir(real)) == ["f"]
    assert run("ls", "other/place", cwd=mnt).stdout.split() == ["f"]


def test_the_hidden_name_and_the_graft_holder_fail_like_ext4(graft: MountedVolume, run: Run) -> None:
    mnt = graft.mountpoint
    assert "Permission denied" in fails(run, "mkdir", "real/dir", cwd=mnt)
    assert "Permission denied" in fails(run, "touch", "real/dir", cwd=mnt)
    assert "Permission denied" in fails(run, "ln", "other/place/f", "real/dir", cwd=mnt)
    assert "No such file or directory" in fails(run, "rm", "-r", "real/dir", cwd=mnt)
    assert "Directory not empty" in fails(run, "rmdir", "other", cwd=mnt)
    assert "Device or resource busy" in fails(run, "mv", "other", "other2", cwd=mnt)
    assert run("ls", "other/place", cwd=mnt).stdout.split() == ["f"]  # nothing changed
    assert sorted(os.listdir(Path(graft.backing) / "real")) == ["dir"]


def test_filters_above_get_the_user_names_and_filters_below_the_real_ones(graft: MountedVolume, run: Run) -> None:
    start = len(graft.log_text())
    run("cat", "other/place/f", cwd=graft.mountpoint)
    seen = re.findall(r"namewatch (\w+): (\S+) opened as (\S+)", graft.log_text()[start:])
    mnt = graft.mountpoint
    assert seen == [
        ("namewatch_below", f"{mnt}/real/dir/f", f"{mnt}/real/dir/f"),
        ("namewatch_above", f"{mnt}/other/place/f", f"{mnt}/other/place/f"),
    ]


def test_inotify_on_the_graft_sees_files_made_there(graft: MountedVolume, run: Run) -> None:
    """The kernel's watch is on the directory's inode, whichever name it was reached by."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        place = os.fsencode(os.path.join(graft.mountpoint, "other", "place"))
        assert libc.inotify_add_watch(fd, place, 0x100) >= 0, os.strerror(ctypes.get_errno())  # IN_CREATE
        run("touch", "other/place/watched", cwd=graft.mountpoint)
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, "no inotify event within 10 s"
        event = os.read(fd, 4096)
        _wd, mask, _cookie, length = struct.unpack_from("iIII", event)
        assert mask & 0x100 and event[16 : 16 + length].rstrip(b"\0") == b"watched"
    finally:
        os.close(fd)
        os.unlink(os.path.join(graft.mountpoint, "other", "place", "watched"))


# -- simrep -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redirect_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("simrep", numbered=True)
    parameters = {"simrep": {"OldMapping": "old", "NewMapping": "new", "RemapRenamesAndLinks": "1"}}
    with mounted_volume(directory, size="64M", filters=("simrep",), parameters=parameters) as vol:
        backing = Path(vol.backing)
        for path, data in {
            "old/x": b"old x\n",
            "old/only-old": b"only in old\n",
            "new/x": b"new x\n",
            "new/sub/s": b"new s\n",
            "older/x": b"older is not old\n",
        }.items():
            (backing / path).parent.mkdir(parents=True, exist_ok=True)
            (backing / path).write_bytes(data)
        yield vol


@pytest.fixture
def redirected(redirect_mount: MountedVolume) -> Iterator[MountedVolume]:
    yield from clean_log(redirect_mount)


def test_opens_under_old_read_new_while_old_lists_its_own(redirected: MountedVolume, run: Run) -> None:
    mnt = redirected.mountpoint
    assert run("ls", "old", cwd=mnt).stdout.split() == ["only-old", "x"]
    assert run("cat", "old/x", cwd=mnt).stdout == "new x\n"
    # ls -l stats each listed name: the attributes are new's, and a name only old has is missing
    listing = run("ls", "-l", "old", cwd=mnt, check=False)
    assert "cannot access 'old/only-old': No such file or directory" in listing.stderr
    assert run("cat", "old/x", cwd=mnt).stdout == "new x\n"  # the listing's inodes were not reused
    stat = run("stat", "-c", "%i %s", "old/x", "new/x", "old", cwd=mnt).stdout.splitlines()
    assert stat[0] == stat[1] and stat[0] != stat[2]
    assert "No such file or directory" in fails(run, "cat", "old/only-old", cwd=mnt)
    assert run("ls", "old/sub", cwd=mnt).stdout.split() == ["s"]
    assert run("cat", "older/x", cwd=mnt).stdout == "older is not old\n"


def test_names_made_in_old_land_in_new(redirected: MountedVolume, run: Run) -> None:
    mnt, backing = redirected.mountpoint, Path(redirected.backing)
    run("sh", "-c", "echo made > old/made && mkdir old/dir", cwd=mnt)
    assert (backing / "new" / "made").read_text() == "made\n" and (backing / "new" / "dir").is_dir()
    run("cp", "old/made", "old/dir/copy", cwd=mnt)
    assert (backing / "new" / "dir" / "copy").read_text() == "made\n"
    # RemapRenamesAndLinks 1: targets in old land in new too
    run("sh", "-c", "echo outside > outside && mv outside old/moved && ln old/moved old/linked", cwd=mnt)
    assert (backing / "new" / "moved").read_text() == "outside\n"
    assert os.stat(backing / "new" / "linked").st_ino == os.stat(backing / "new" / "moved").st_ino
    run("rm", "-r", "old/made", "old/dir", "old/moved", "old/linked", cwd=mnt)
    assert sorted(os.listdir(backing / "new")) == ["sub", "x"]
    assert sorted(os.listdir(backing / "old")) == ["only-old", "x"]  # old itself never changed


def test_errors_under_old_are_those_of_the_names_in_new(redirected: MountedVolume, run: Run) -> None:
    mnt = redirected.mountpoint
    err = fails(run, "cat", "old/nothing", cwd=mnt)
    assert "No such file or directory" in err
    assert "Is a directory" in fails(run, "sh", "-c", "echo x > old/sub", cwd=mnt)
    assert os.path.exists(os.path.join(mnt, "old", "sub"))
    with pytest.raises(OSError) as info:
        os.rmdir(os.path.join(mnt, "old", "x"))
    assert info.value.errno == errno.ENOTDIR
