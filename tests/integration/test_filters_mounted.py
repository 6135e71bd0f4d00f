"""Filters on a real mount: loaded from their INF at mount time, transparent to ordinary tools."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, release, why_no_mount

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))


@pytest.fixture
def filtered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    with mounted_volume(
        tmp_path_factory.mktemp("filtered", numbered=True), size="1G", filters=("passthrough", "nullfilter")
    ) as vol:
        yield vol


def test_filters_attach_at_their_inf_altitudes(filtered: MountedVolume) -> None:
    log = filtered.log_text()
    assert "attached passthrough/PassThrough Instance at altitude 370030" in log
    assert "attached nullfilter/NullFilter Instance at altitude 47000" in log


def test_ordinary_tools_through_a_passthrough_stack(filtered: MountedVolume) -> None:
    source = Path(sysconfig.get_paths()["stdlib"]) / "json"
    target = Path(filtered.mountpoint) / "json"
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(source), str(target)], capture_output=True, text=True)
    assert (diff.returncode, diff.stdout) == (0, "")
    subprocess.run(["rm", "-rf", str(target)], check=True)
    assert not target.exists()
    assert " ERROR " not in filtered.log_text()


def _mount_fails(tmp_path: Path, *args: str) -> str:
    image, mnt, log = tmp_path / "v.img", tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    subprocess.run([sys.executable, "-m", "fltfuse", "volume", "create", str(image), "--size", "64M"], check=True)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fltfuse", "mount", f"--log-file={log}", *args, str(image), str(mnt)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1
        assert done.stderr.endswith(f"daemon log: {log}\n") and log.exists()
        return done.stderr
    finally:
        release(str(mnt), str(image))


def test_an_unknown_filter_is_a_clear_mount_error(tmp_path: Path) -> None:
    err = _mount_fails(tmp_path, "--filter", "nosuchfilter")
    assert "no INF for filter 'nosuchfilter'" in err


def test_a_malformed_inf_names_its_file_and_line(tmp_path: Path) -> None:
    infs = tmp_path / "infs"
    infs.mkdir()
    (infs / "broken.inf").write_text('[Version]\nSignature = "$Windows NT$\nClass = Bottom\n')
    err = _mount_fails(tmp_path, "--filter-path", str(infs), "--filter", "broken")
    assert f"{infs / 'broken.inf'}:2:" in err
