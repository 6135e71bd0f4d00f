"""The scanner's tests' common parts: a ``fltfuse-scanner`` process, and sample files for the ClamAV engine.

:class:`Service` is started with ``-v --log FILE``, so that every scan it judged is one line of its log, which
:meth:`Service.verdicts` reads back. The service must be another process than the volume's: the scanner never
scans the requests of the process connected to its port.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from filters.scanner.engines import eicar
from tests.clamd import TEST_PATTERN

REPO = Path(__file__).resolve().parents[1]
CLEAN = b"nothing to see here\n"


class Service:
    """A running ``fltfuse-scanner`` process and its log file (its stderr goes to ``<log>.out``)."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path):
        self.process = process
        self.log = log

    @classmethod
    def start(cls, args: Sequence[str], log: Path, *, command: Sequence[str] | None = None) -> Service:
        """Start ``command`` (default: ``python -m filters.scanner.user -v --log LOG``) with ``args``."""
        if command is None:
            command = [sys.executable, "-m", "filters.scanner.user", "-v", "--log", str(log)]
        with open(log.with_suffix(".out"), "wb") as out:
            process = subprocess.Popen([*command, *args], cwd=REPO, stdout=out, stderr=out)
        return cls(process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def verdicts(self) -> list[str]:
        """Its verdict lines, one per scan, without the timestamp, the requestor's pid and the engine:
        ``clean open /a.txt``, ``INFECTED write /b.txt: EICAR-Test-File``."""
        found = []
        for line in self.log_text().splitlines():
            _, _, message = line.partition(" fltfuse-scanner: ")
            if message.startswith(("clean ", "INFECTED ")):
                what, _, rest = message.partition(" (pid ")
                signature = rest.partition("): ")[2].rpartition(" [")[0]
                found.append(f"{what}: {signature}" if signature else what)
        return found

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, in case it was stopped) and reap it; SIGKILL if it does not go in 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def zipped(name: str, content: bytes) -> bytes:
    """A zip archive holding ``content`` as ``name``, beside a clean file."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(name, content)
        z.writestr("readme.txt", CLEAN)
    return archive.getvalue()


def clamav_samples(noise: bytes) -> dict[str, bytes]:
    """Files for comparing the ClamAV engine with clamscan on ``tests.clamd``'s database (``noise``: at least
    100 kB free of its signatures): three clean, four infected (two of them inside zip archives)."""
    return {
        "clean.txt": CLEAN,
        "noise.bin": noise,
        "eicar.com": eicar(),
        "eicar-plus.com": eicar() + b"\n",  # not the EICAR file byte for byte: the hash signature misses it
        "pattern.bin": noise[:100_000] + TEST_PATTERN + noise[:1000],
        "eicar.zip": zipped("inner/eicar.com", eicar()),
        "pattern.zip": zipped("deep/pattern.bin", b"..." + TEST_PATTERN),
    }


def slow_rules(path: Path, count: int = 20) -> Path:
    """A rules file of ``count`` random 12-byte patterns (and no EICAR rule): the pattern engine makes one pass
    over the data per rule, so a scan with these takes about ``count`` times longer (20: ~50 MiB/s here)."""
    rng = random.Random(count)
    path.write_text("".join(f"Slow-{i} = hex:{rng.randbytes(12).hex()}\n" for i in range(count)))
    return path
