"""The metadatamanager sample on real mounts: ordinary tools, tracing filters above and below it, release and
reacquire with setfattr, and the metadata file on the backing ext4 after unmount, fltmc unload and a remount.

The tracing filter (``mmtrace``, written to a temporary filter directory) logs one JSON line per request it
sees, and per listing on its way up, to the daemon's log: its default instance "Trace Above" sits at 380000,
above metadatamanager (370060); "Trace Below" (360000) is attached with fltmc.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse.testing import MountedVolume, mount, mounted_volume, release, why_no_mount

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

META = ".fltmeta"
FLTMC = [sys.executable, "-m", "fltfuse.fltmc"]

TRACER = '''
"""mmtrace: logs each request it sees, and each listing on its way up, as one JSON line."""
import json
import logging

from fltfuse import (
    FUSE_PRODUCES, CallbackDataFlags, DirectoryControlParameters, FilterRegistration, MajorFunction, NtStatus,
    OperationRegistration, PostopCallbackStatus, PreopCallbackStatus,
)

log = logging.getLogger("mmtrace")


def _trace(cbd, objects, listing):
    params = cbd.iopb.parameters
    name = getattr(params, "name", b"")
    log.info("MMTRACE %s", json.dumps({
        "instance": objects.instance.name,
        "major": params.MAJOR.name,
        "inode": cbd.iopb.target_file_object.inode,
        "name": name.decode(errors="replace") if isinstance(name, bytes) else "",
        "generated": bool(cbd.flags & CallbackDataFlags.GENERATED_IO),
        "initiator": cbd.initiator.filter.name if cbd.initiator is not None else None,
        "listing": listing,
    }))


def pre(cbd, objects):
    _trace(cbd, objects, None)
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK


def post(cbd, objects, context, flags):
    if isinstance(cbd.iopb.parameters, DirectoryControlParameters):
        _trace(cbd, objects, [e.name.decode(errors="replace") for e in cbd.iopb.parameters.entries])
    return PostopCallbackStatus.FINISHED_PROCESSING


def query_teardown(objects, flags):
    return NtStatus.SUCCESS


def unload(flags):
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=tuple(
        OperationRegistration(major, pre, post) for major in sorted(FUSE_PRODUCES) if major is not MajorFunction.FORGET
    ),
    filter_unload=unload,
    instance_query_teardown=query_teardown,
)
'''

TRACER_INF = r"""
;;; mmtrace: logs every request it sees (above metadatamanager by default, below it when attached by hand)

[Version]
Signature   = "$Windows NT$"
Class       = "ActivityMonitor"
ClassGuid   = {b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}
Provider    = %ManufacturerName%
DriverVer   = 11/21/2026,1.0.0.0

[DefaultInstall.NTamd64.Services]
AddService  = %ServiceName%,,Trace.Service

[Trace.Service]
DisplayName    = %ServiceName%
Description    = %ServiceDescription%
ServiceBinary  = mmtrace
Dependencies   = "FltMgr"
ServiceType    = 2                      ; SERVICE_FILE_SYSTEM_DRIVER
StartType      = 3                      ; SERVICE_DEMAND_START
ErrorControl   = 1                      ; SERVICE_ERROR_NORMAL
LoadOrderGroup = "FSFilter Activity Monitor"
AddReg         = Trace.AddRegistry

[Trace.AddRegistry]
HKR,"Parameters\Instances","DefaultInstance",0x00000000,%DefaultInstance%
HKR,"Parameters\Instances\"%Instance1.Name%,"Altitude",0x00000000,"380000"
HKR,"Parameters\Instances\"%Instance1.Name%,"Flags",0x00010001,0x0
HKR,"Parameters\Instances\"%Instance2.Name%,"Altitude",0x00000000,"360000"
HKR,"Parameters\Instances\"%Instance2.Name%,"Flags",0x00010001,0x1       ; attached by hand

[Strings]
ManufacturerName    = "fltfuse tests"
ServiceDescription  = "Traces requests for the metadatamanager tests"
ServiceName         = "mmtrace"
DefaultInstance     = "Trace Above"
Instance1.Name      = "Trace Above"
Instance2.Name      = "Trace Below"
"""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done


def refused(*argv: str) -> str:
    """Run a command that must fail; its error message."""
    done = run(*argv, check=False)
    assert done.returncode != 0, f"{' '.join(argv)} succeeded"
    return done.stderr


def held_open(pid: int, path: str) -> int:
    """How many read-write descriptors process ``pid`` has open on ``path`` (O_PATH pins do not count)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        match = re.search(r"^flags:\s+([0-7]+)$", info, re.MULTILINE)
        assert match is not None, info
        flags = int(match.group(1), 8)
        if not flags & os.O_PATH and flags & os.O_ACCMODE == os.O_RDWR:
            count += 1
    return count


def on_image(image: str) -> str:
    """The metadata file as the ext4 image holds it (the volume is not mounted): debugfs reads it."""
    return run("debugfs", "-R", f"cat /{META}", image).stdout


def control(vol: MountedVolume, value: str) -> None:
    run("setfattr", "-n", "user.metadatamanager", "-v", value, vol.mountpoint)


def traces(vol: MountedVolume, start: int = 0) -> list[dict[str, Any]]:
    return [
        json.loads(line.split("MMTRACE ", 1)[1]) for line in vol.log_text()[start:].splitlines() if "MMTRACE " in line
    ]


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    """A volume with the tracer above metadatamanager (mount time) and below it (fltmc attach)."""
    tracer = tmp_path_factory.mktemp("mmtrace")
    (tracer / "mmtrace.py").write_text(TRACER)
    (tracer / "inf").mkdir()
    (tracer / "inf" / "mmtrace.inf").write_text(TRACER_INF)
    directory = tmp_path_factory.mktemp("metadatamanager", numbered=True)
    filters = ("metadatamanager", "mmtrace")
    with mounted_volume(directory, size="128M", filters=filters, filter_path=(str(tracer / "inf"),)) as mounted:
        run(*FLTMC, "attach", "mmtrace", mounted.mountpoint, "-i", "Trace Below")
        yield mounted
    mounted.assert_no_errors_logged()
    assert mounted.log_text().count("metadata volume context cleaned up") == 1
    assert on_image(mounted.image).endswith(" volume_dismount\n")


def test_the_daemon_holds_the_file_open_and_ls_does_not_show_it(vol: MountedVolume) -> None:
    listing = run("ls", "-a", vol.mountpoint).stdout.split()
    assert META not in listing and "." in listing
    path = os.path.join(vol.backing, META)
    assert os.path.isfile(path)  # made on the backing ext4 by the first request
    assert held_open(vol.pid, path) == 1
    assert Path(path).read_text().startswith("open 1\n")


def test_ordinary_tools_cannot_reach_it_and_work_on_other_files(vol: MountedVolume, tmp_path: Path) -> None:
    root = Path(vol.mountpoint)
    meta = str(root / META)
    source = tmp_path / "source.txt"
    source.write_text("copied through the mount\n")
    run("cp", str(source), str(root / "copy.txt"))
    assert run("cat", str(root / "copy.txt")).stdout == "copied through the mount\n"
    run("mkdir", str(root / "dir"))
    run("mv", str(root / "copy.txt"), str(root / "dir" / "moved.txt"))
    assert "No such file or directory" in refused("cat", meta)
    assert "No such file or directory" in refused("rm", meta)
    assert "No such file or directory" in refused("mv", meta, str(root / "stolen"))
    assert "No such file or directory" in refused("stat", meta)
    assert "Permission denied" in refused("touch", meta)
    assert "Permission denied" in refused("mkdir", meta)
    assert "Permission denied" in refused("mv", str(root / "dir" / "moved.txt"), meta)
    assert "Permission denied" in refused("ln", str(root / "dir" / "moved.txt"), meta)
    assert "Permission denied" in refused("ln", "-s", "anything", meta)
    assert "Permission denied" in refused("sh", "-c", f"echo mine > {meta}")
    assert run("cat", str(root / "dir" / "moved.txt")).stdout == "copied through the mount\n"
    assert os.path.isfile(os.path.join(vol.backing, META))  # still there, untouched
    content = Path(vol.backing, META).read_text()
    assert "create regular /copy.txt\ncreate directory /dir\n" in content
    assert "mine" not in content and "stolen" not in content and "anything" not in content


def test_release_and_reacquire_with_setfattr(vol: MountedVolume) -> None:
    path = os.path.join(vol.backing, META)
    run("ls", vol.mountpoint)  # the file is open
    assert held_open(vol.pid, path) == 1
    control(vol, "release")
    assert held_open(vol.pid, path) == 0
    closed = Path(path).read_text()
    assert re.search(r"close (\d+) released\n$", closed)
    run("touch", os.path.join(vol.mountpoint, "made while released"))
    assert held_open(vol.pid, path) == 0  # not reopened by requests
    control(vol, "reacquire")
    assert held_open(vol.pid, path) == 1
    assert Path(path).read_text().startswith(closed)  # appended to
    session = int(re.findall(r"^open (\d+)$", closed, re.MULTILINE)[-1])
    assert Path(path).read_text()[len(closed) :] == f"open {session + 1}\ncreate regular /made while released\n"
    assert "Invalid argument" in refused("setfattr", "-n", "user.metadatamanager", "-v", "lock", vol.mountpoint)
    assert "user.metadatamanager" not in run("getfattr", "-d", vol.mountpoint).stdout  # ext4 never stored it


def test_the_filter_above_never_sees_its_io_and_the_filter_below_does(vol: MountedVolume) -> None:
    start = len(vol.log_text())
    control(vol, "release")
    control(vol, "reacquire")
    run("sh", "-c", f"echo traced > {os.path.join(vol.mountpoint, 'traced.txt')}")
    run("ls", "-a", vol.mountpoint)
    seen = traces(vol, start)
    inode = os.stat(os.path.join(vol.backing, META)).st_ino
    above = [t for t in seen if t["instance"] == "Trace Above"]
    below = [t for t in seen if t["instance"] == "Trace Below"]
    assert above and below
    assert not [t for t in above if t["generated"] or t["inode"] == inode or META in (t["listing"] or ())]
    mine = [t for t in below if t["generated"]]
    assert {t["initiator"] for t in mine} == {"metadatamanager"}
    majors = {t["major"] for t in mine}
    assert {"LOOKUP", "CREATE", "READ", "WRITE", "FLUSH_BUFFERS", "CLEANUP", "CLOSE"} <= majors
    assert all(t["inode"] == inode for t in mine if t["major"] in ("READ", "WRITE", "FLUSH_BUFFERS", "CLOSE"))
    assert any(META in (t["listing"] or ()) for t in below)  # below it, the listing still has the file


def test_unmount_unload_and_remount_close_reopen_and_append(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("metadatamanager-remount", numbered=True)
    with mounted_volume(directory, size="128M", filters=("metadatamanager",)) as first:
        run("touch", os.path.join(first.mountpoint, "one"))
    first_log = first.log_text()
    first.assert_no_errors_logged()
    assert first_log.count("metadata volume context cleaned up") == 1
    assert on_image(first.image) == "open 1\ncreate regular /one\nclose 1 volume_dismount\n"

    second = mount(first.image, first.mountpoint, filters=("metadatamanager",), log_file=first.log_path)
    try:
        root = second.mountpoint
        path = os.path.join(second.backing, META)
        run("touch", os.path.join(root, "two"))
        run(*FLTMC, "unload", "metadatamanager", root)
        assert held_open(second.pid, path) == 0
        assert META in run("ls", "-a", root).stdout.split()  # no filter: an ordinary file
        run(*FLTMC, "load", "metadatamanager", root)
        run("touch", os.path.join(root, "three"))  # the reloaded instance opens it again
        assert held_open(second.pid, path) == 1
        # The kernel may still know the name from the ls above: the open then goes by inode, and is refused too.
        message = refused("cat", os.path.join(root, META))
        assert "Permission denied" in message or "No such file or directory" in message
        assert META not in run("ls", "-a", root).stdout.split()
    finally:
        release(second.mountpoint, second.image)
    second_log = second.log_text().removeprefix(first_log)  # the daemon of a mount point appends to one log
    second.assert_no_errors_logged(len(first_log))
    assert second_log.count("metadata volume context cleaned up") == 2  # once per instance
    assert on_image(first.image) == (
        "open 1\ncreate regular /one\nclose 1 volume_dismount\n"
        "open 2\ncreate regular /two\nclose 2 filter_unload\n"
        "open 3\ncreate regular /three\nclose 3 volume_dismount\n"
    )
