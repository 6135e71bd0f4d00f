"""The README's worked example on a real mount: loaded with fltmc, used by ordinary tools, unloaded under load."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fltfuse.testing.mounted import mounted_volume

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"<!-- example: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)```\n", re.S)


def fltmc(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "fltfuse.fltmc", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readme_filter_loads_serves_ordinary_tools_and_unloads_under_load(
    scratch: Path, run: Callable[..., Any]
) -> None:
    project = scratch / "nosecrets-project"
    for match in _BLOCK.finditer(README.read_text()):
        path = project / match["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(match["body"])
    with mounted_volume(scratch, size="256M", filter_path=(str(project / "inf"),)) as vol:
        mnt = Path(vol.mountpoint)
        assert "nosecrets" not in fltmc("instances", vol.mountpoint)
        fltmc("load", "nosecrets", vol.mountpoint)
        rows = [line.split() for line in fltmc("instances", vol.mountpoint).splitlines()[2:]]
        assert ["nosecrets", vol.mountpoint, "265100", "NoSecrets", "Instance", "0", "automatic", "0x0"] in rows

        # Ordinary tools through the filter: everything but *.secret works.
        src = scratch / "src"
        (src / "docs").mkdir(parents=True)
        (src / "docs" / "a.txt").write_text("alpha\n" * 1000)
        (src / "b.bin").write_bytes(bytes(range(256)) * 400)
        run("cp", "-a", src, mnt / "copy")
        run("diff", "-r", src, mnt / "copy")
        run("tar", "-C", mnt, "-cf", scratch / "copy.tar", "copy")
        assert run("tar", "-tf", scratch / "copy.tar").stdout.count("copy/") >= 3
        denied = run("sh", "-c", f"echo hunter2 > {mnt}/keys.secret", check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert "keys.secret" not in run("ls", mnt).stdout

        # Unloaded while a writer keeps working: no request fails that the filter did not fail.
        errors: list[BaseException] = []
        stop = threading.Event()
        done_ops = [0]

        def writer() -> None:
            try:
                while not stop.is_set():
                    n = done_ops[0]
                    path = mnt / f"w{n % 20}.txt"
                    path.write_text(f"line {n}\n")
                    assert path.read_text() == f"line {n}\n"
                    done_ops[0] += 1
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while done_ops[0] < 200 and thread.is_alive():
                stop.wait(0.01)
            fltmc("unload", "nosecrets", vol.mountpoint)
            before = done_ops[0]
            while done_ops[0] < before + 200 and thread.is_alive():
                stop.wait(0.01)
        finally:
            stop.set()
            thread.join(30)
        assert errors == []
        assert "nosecrets" not in fltmc("instances", vol.mountpoint)
        (mnt / "keys.secret").write_text("now allowed\n")  # the filter is gone
        assert (mnt / "keys.secret").read_text() == "now allowed\n"
        log = vol.log_text()
        assert "filter bug" not in log and "internal error" not in log.lower()
