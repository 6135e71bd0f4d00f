"""The anti-virus service's engines: byte patterns from a rules file, and a real clamd with a database made here."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from filters.scanner.engines import (
    INSTREAM_CHUNK,
    READ_SIZE,
    ClamdEngine,
    Engine,
    EngineError,
    PatternEngine,
    Verdict,
    eicar,
)
from tests.clamd import (
    EICAR_SIGNATURE,
    TEST_PATTERN,
    TEST_PATTERN_SIGNATURE,
    Clamd,
    clamscan_verdicts,
    running_clamd,
)

# incompressible filler without a byte below 0x80, so free of every (ASCII) pattern used here
NOISE = random.Random(5).randbytes(3 << 20).translate(bytes(range(0x80, 0x100)) * 2)


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    with running_clamd(tmp_path_factory.mktemp("clamd")) as clamd:
        yield clamd


@pytest.fixture(scope="module")
def clamav(clamd: Clamd) -> ClamdEngine:
    engine = ClamdEngine(clamd.socket, database=clamd.database, timeout=10)
    engine.fingerprint()  # the first call has clamd load the database (with the engine's probe)
    return engine


@pytest.fixture
def own_clamd(tmp_path: Path) -> Iterator[Clamd]:
    """A clamd for one test, which may change its database, stop or kill it."""
    with running_clamd(tmp_path / "clamd") as clamd:
        yield clamd


@pytest.fixture
def default_engine() -> PatternEngine:
    return PatternEngine.from_rules_file(PatternEngine.DEFAULT_RULES)


def write_rules(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def piped(data: bytes, write_size: int = 4096) -> BinaryIO:
    """A pipe's read end (unbuffered: reads return what the pipe holds) that a thread fills with ``data``."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        # an engine that has its verdict may stop reading and close the pipe
        with contextlib.suppress(BrokenPipeError), open(write_fd, "wb", buffering=0) as pipe:
            for start in range(0, len(data), write_size):
                pipe.write(data[start : start + write_size])

    threading.Thread(target=feed, daemon=True).start()
    return open(read_fd, "rb", buffering=0)


class Trickle(io.BytesIO):
    """A stream that returns at most ``piece`` bytes per read and records how many bytes were asked for."""

    def __init__(self, data: bytes, piece: int) -> None:
        super().__init__(data)
        self.piece = piece
        self.asked: list[int | None] = []

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(size)
        assert size is not None and size > 0
        return super().read(min(self.piece, size))


# -- the EICAR file and the pattern engine ----------------------------------------------------------------------


def test_eicar_is_the_eicar_test_file() -> None:
    assert len(eicar()) == 68
    assert hashlib.md5(eicar()).hexdigest() == "44d88612fea8a8f36de82e1278abb02f"


def test_default_rules_detect_eicar_anywhere_and_nothing_else(default_engine: PatternEngine) -> None:
    assert eicar() not in PatternEngine.DEFAULT_RULES.read_bytes()
    assert [rule.name for rule in default_engine.rules] == ["EICAR-Test-File"]
    infected = Verdict(True, "EICAR-Test-File", "pattern")
    assert default_engine.scan_bytes(eicar()) == infected
    assert default_engine.scan(io.BytesIO(NOISE[:1000] + eicar() + b"\n")) == infected
    assert default_engine.scan_bytes(eicar()[:-1]) == Verdict(False, None, "pattern")
    assert default_engine.scan(io.BytesIO(NOISE + TEST_PATTERN)) == Verdict(False, None, "pattern")
    assert default_engine.scan(io.BytesIO(b"")) == Verdict(False, None, "pattern")


def test_text_and_hex_rules_and_the_earliest_match(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "x.rules",
        "# comment",
        "",
        "   # indented comment",
        "Foul = text:foul",
        "Spaced=text: two words ",
        "Bytes = hex:00 ff 10 20",
        "  Indented.Name_2 = HEX:ab",  # the kind is lower case only: this line is malformed
    )
    with pytest.raises(EngineError, match=r"x\.rules:7:"):
        PatternEngine.from_rules_file(rules)
    rules.write_text(rules.read_text().replace("HEX:ab", "hex:abcd"))
    engine = PatternEngine.from_rules_file(rules)
    assert [(r.name, r.pattern) for r in engine.rules] == [
        ("Foul", b"foul"),
        ("Spaced", b" two words "),
        ("Bytes", b"\x00\xff\x10\x20"),
        ("Indented.Name_2", b"\xab\xcd"),
    ]
    assert engine.scan_bytes(b"a-two words-b").signature is None  # the text is verbatim: spaces around too
    assert engine.scan_bytes(b"a two words b").signature == "Spaced"
    assert engine.scan(io.BytesIO(b"..\xab\xcd..foul..\x00\xff\x10\x20")).signature == "Indented.Name_2"
    assert engine.scan(Trickle(b"x\x00\xff\x10\x20 foul", 3)).signature == "Bytes"
    assert engine.scan_bytes(b"fou l \x00\xff\x10") == Verdict(False, None, "pattern")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("Foul text:foul", "expected 'Name = hex"),
        ("Foul = hex:6g", "bad hex bytes"),
        ("Foul = hex:abc", "bad hex bytes"),
        ("Foul = text:", "empty pattern"),
        ("Foul = hex:", "empty pattern"),
        ("Foul = base64:Zm91bA==", "expected 'Name = hex"),
        ("= text:foul", "expected 'Name = hex"),
        ("-Foul = text:foul", "expected 'Name = hex"),
        ("Foul = text:x # not a comment", None),  # fine: the text runs to the line end
    ],
)
def test_a_malformed_rule_names_the_file_and_line(tmp_path: Path, line: str, why: str | None) -> None:
    rules = write_rules(tmp_path / "bad.rules", "# header", "Good = text:good", line, "Later = text:later")
    if why is None:
        engine = PatternEngine.from_rules_file(rules)
        assert engine.scan_bytes(b"x # not a comment").infected
        return
    with pytest.raises(EngineError) as raised:
        PatternEngine.from_rules_file(rules)
    assert f"{rules}:3: " in str(raised.value)
    assert why in str(raised.value)


def test_rules_that_are_not_utf8_or_missing(tmp_path: Path) -> None:
    rules = tmp_path / "latin1.rules"
    rules.write_bytes(b"Good = text:good\nBad = text:caf\xe9\n")
    with pytest.raises(EngineError, match=rf"{rules}:2: not UTF-8"):
        PatternEngine.from_rules_file(rules)
    with pytest.raises(EngineError, match=rf"cannot read rules file {tmp_path}/absent.rules"):
        PatternEngine.from_rules_file(tmp_path / "absent.rules")


@pytest.mark.parametrize("pattern", [b"ab", b"fltfuse-straddle", eicar()], ids=["2-bytes", "16-bytes", "eicar"])
def test_a_pattern_straddling_reads_is_found(tmp_path: Path, pattern: bytes) -> None:
    engine = PatternEngine.from_rules_file(write_rules(tmp_path / "r", "Short = text:zq", f"It = hex:{pattern.hex()}"))
    for cut in range(1, len(pattern)):  # `cut` bytes of the pattern in the first read, the rest in the second
        data = NOISE[: READ_SIZE - cut] + pattern + NOISE[:100]
        assert engine.scan(io.BytesIO(data)) == Verdict(True, "It", "pattern"), cut
        assert engine.scan(io.BytesIO(data[:-101])) == Verdict(False, None, "pattern"), cut  # pattern cut short
    # reads shorter than the pattern: it spans many of them
    trickle = Trickle(NOISE[:5000] + pattern + NOISE[:50], piece=3)
    assert engine.scan(trickle) == Verdict(True, "It", "pattern")
    assert engine.scan(Trickle(NOISE[:5000] + pattern[:-1] + b"zq", piece=5)) == Verdict(True, "Short", "pattern")


def test_streams_are_read_in_bounded_pieces(default_engine: PatternEngine) -> None:
    stream = Trickle(NOISE * 3, piece=READ_SIZE)
    assert default_engine.scan(stream) == Verdict(False, None, "pattern")
    assert stream.tell() == len(NOISE) * 3
    assert set(stream.asked) == {READ_SIZE}


def test_streams_from_a_pipe(default_engine: PatternEngine, clamav: ClamdEngine) -> None:
    big = NOISE + NOISE[:12345]
    assert default_engine.scan(piped(big + eicar() + big)) == Verdict(True, "EICAR-Test-File", "pattern")
    assert default_engine.scan(piped(big, write_size=65536)) == Verdict(False, None, "pattern")
    # clamd's StreamMaxLength here is 1M
    assert clamav.scan(piped(NOISE[:800_000] + TEST_PATTERN)) == Verdict(True, TEST_PATTERN_SIGNATURE, "clamav")
    assert clamav.scan(piped(eicar(), write_size=7)) == Verdict(True, EICAR_SIGNATURE, "clamav")
    assert clamav.scan(piped(NOISE[:900_000])) == Verdict(False, None, "clamav")


def test_rules_are_reloaded_when_the_file_changes(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "r.rules", "Foul = text:foul")
    engine = PatternEngine.from_rules_file(rules)
    first = engine.fingerprint()
    assert first == hashlib.sha256(rules.read_bytes()).hexdigest()
    assert engine.fingerprint() == first
    assert engine.scan_bytes(b"rotten").signature is None

    write_rules(rules, "Foul = text:foul", "Rotten = text:rotten")  # rewritten in place
    second = engine.fingerprint()
    assert second == hashlib.sha256(rules.read_bytes()).hexdigest() != first
    assert engine.scan_bytes(b"rotten").signature == "Rotten"

    replacement = write_rules(tmp_path / "new", "Rotten = text:rotten")  # replaced by a rename
    replacement.rename(rules)
    assert engine.scan_bytes(b"foul") == Verdict(False, None, "pattern")  # scan checks for changes too
    assert engine.fingerprint() not in (first, second)

    write_rules(rules, "Rotten = text:rotten", "Broken = hex:xyz")
    for call in (engine.fingerprint, lambda: engine.scan_bytes(b"rotten")):
        with pytest.raises(EngineError, match=rf"{rules}:2: bad hex"):
            call()  # no verdict with a broken rules file, not even from the old rules
    rules.unlink()
    with pytest.raises(EngineError, match="cannot read rules file"):
        engine.fingerprint()
    write_rules(rules, "Foul = text:foul")
    assert engine.fingerprint() == first
    assert engine.scan_bytes(b"foul").signature == "Foul"


# -- the ClamAV engine ------------------------------------------------------------------------------------------


def test_clamd_verdicts(clamav: ClamdEngine) -> None:
    assert clamav.scan_bytes(b"just text\n") == Verdict(False, None, "clamav")
    assert clamav.scan_bytes(b"") == Verdict(False, None, "clamav")
    assert clamav.scan_bytes(eicar()) == Verdict(True, EICAR_SIGNATURE, "clamav")
    assert clamav.scan_bytes(eicar() + b"\n") == Verdict(False, None, "clamav")  # a hash signature: that file only
    assert clamav.scan_bytes(TEST_PATTERN) == Verdict(True, TEST_PATTERN_SIGNATURE, "clamav")
    # a body pattern straddling two INSTREAM chunks
    data = NOISE[: INSTREAM_CHUNK - 5] + TEST_PATTERN + NOISE[:1000]
    assert clamav.scan(io.BytesIO(data)) == Verdict(True, TEST_PATTERN_SIGNATURE, "clamav")


def test_clamd_stream_max_length_is_an_error(clamav: ClamdEngine) -> None:
    assert clamav.scan(io.BytesIO(NOISE[: (1 << 20) - 1])) == Verdict(False, None, "clamav")
    for data in (NOISE[: (1 << 20) + 1], NOISE):  # just over the limit, and well over (clamd stops reading)
        with pytest.raises(EngineError, match=r"INSTREAM size limit exceeded.*StreamMaxLength"):
            clamav.scan(io.BytesIO(data))
    assert clamav.scan_bytes(TEST_PATTERN).infected  # clamd is fine


def test_clamd_fingerprint_is_stable_while_nothing_changes(clamd: Clamd, clamav: ClamdEngine) -> None:
    fingerprint = clamav.fingerprint()
    probe = (clamd.database / ClamdEngine.PROBE_FILE).read_bytes()
    assert fingerprint.startswith("ClamAV ") and " db:" in fingerprint
    assert [clamav.fingerprint() for _ in range(5)] == [fingerprint] * 5
    assert (clamd.database / ClamdEngine.PROBE_FILE).read_bytes() == probe  # no reload either
    assert ClamdEngine(clamd.socket).fingerprint() == fingerprint.split(" db:")[0]  # without a database: VERSION


def test_a_database_change_is_in_effect_when_the_fingerprint_changes(tmp_path: Path) -> None:
    # 100,000 more signatures make each load take a while (about 0.4 s here): clamd (ConcurrentDatabaseReload
    # yes, its default) answers RELOADING, PING and scans with the old database meanwhile, so only the probe
    # tells it is done.
    bulk = random.Random(7)
    signatures = {f"Bulk-{i}": bulk.randbytes(12) for i in range(100_000)}

    class HeldEngine(ClamdEngine):
        """Holds the reloading caller's probe scans until ``go_on`` is set, so that what other callers see
        during a reload is tested at a moment the test chooses, not one clamd's load time happens to allow."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.reloading, self.go_on = threading.Event(), threading.Event()

        def scan_bytes(self, data: bytes) -> Verdict:
            if data.startswith(b"fltfuse-reload-probe-"):
                self.reloading.set()
                assert self.go_on.wait(30)
            return super().scan_bytes(data)

    with running_clamd(tmp_path / "clamd", signatures=signatures) as clamd:
        engine = HeldEngine(clamd.socket, database=clamd.database, timeout=10)
        engine.go_on.set()  # the first reload (confirming the database clamd started with) is not held
        before = engine.fingerprint()
        assert engine.scan_bytes(b"a new-virus-body here") == Verdict(False, None, "clamav")

        name = clamd.add_signature("New-Virus", b"new-virus-body")
        engine.go_on.clear()
        engine.reloading.clear()
        with ThreadPoolExecutor(1) as reloader:
            after = reloader.submit(engine.fingerprint)
            assert engine.reloading.wait(30)
            # another caller meanwhile: the database clamd still scans with, at once
            assert engine.fingerprint() == before
            assert not after.done()
            engine.go_on.set()
            assert after.result(timeout=30) != before
        # the reloading caller returned only once clamd scans with the new database, not at RELOADING
        assert engine.scan_bytes(b"a new-virus-body here") == Verdict(True, name, "clamav")
        assert engine.fingerprint() == after.result()

        # a database clamd cannot load: it keeps the old one, and the engine says so instead of pretending
        with open(clamd.database / "added.ndb", "a") as f:
            f.write("Broken:0:*:zz\n")
        impatient = ClamdEngine(clamd.socket, database=clamd.database, timeout=10, reload_timeout=1)
        with pytest.raises(EngineError, match="still scanning with its previous database"):
            impatient.fingerprint()


def test_clamd_killed_mid_scan_is_an_error_not_a_hang(own_clamd: Clamd) -> None:
    engine = ClamdEngine(own_clamd.socket, timeout=10)
    assert engine.scan_bytes(TEST_PATTERN).infected
    first_read, go_on = threading.Event(), threading.Event()

    class Held(io.BytesIO):
        """Hands out NOISE in pieces; holds the second read until clamd is dead."""

        def read(self, size: int | None = -1) -> bytes:
            if self.tell():
                first_read.set()
                go_on.wait(10)
            return super().read(100_000)

    with ThreadPoolExecutor(1) as pool:
        scan = pool.submit(engine.scan, Held(NOISE))
        assert first_read.wait(10)
        own_clamd.kill()
        go_on.set()
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"connection (lost|closed)"):
            scan.result(timeout=10)
        assert time.monotonic() - started < 2
    with pytest.raises(EngineError, match="cannot connect"):
        engine.scan_bytes(b"x")
    with pytest.raises(EngineError, match="cannot connect"):
        engine.fingerprint()


def test_a_hung_clamd_times_out(own_clamd: Clamd) -> None:
    engine = ClamdEngine(own_clamd.socket, timeout=0.5)
    own_clamd.stop()
    try:
        for data in (TEST_PATTERN, NOISE[:900_000]):  # clamd's socket buffers take the first, not the second
            started = time.monotonic()
            with pytest.raises(EngineError, match=r"(no reply|took no data) .*0\.5 s"):
                engine.scan(io.BytesIO(data))
            assert 0.4 < time.monotonic() - started < 2
    finally:
        own_clamd.resume()
    assert engine.scan_bytes(TEST_PATTERN).infected


@pytest.mark.parametrize("engine_name", ["pattern", "clamav"])
def test_concurrent_scans_from_8_threads(engine_name: str, default_engine: PatternEngine, clamav: ClamdEngine) -> None:
    engine: Engine = default_engine if engine_name == "pattern" else clamav
    embedded = NOISE[:200_000] + (eicar() if engine_name == "pattern" else TEST_PATTERN) + NOISE[:1000]
    samples: list[tuple[bytes, str | None]] = [
        (NOISE[:300_000], None),
        (eicar(), "EICAR-Test-File" if engine_name == "pattern" else EICAR_SIGNATURE),
        (embedded, "EICAR-Test-File" if engine_name == "pattern" else TEST_PATTERN_SIGNATURE),
    ]
    barrier = threading.Barrier(8)

    def worker(seed: int) -> list[tuple[int, Verdict]]:
        barrier.wait()
        order = random.Random(seed).choices(range(len(samples)), k=30)
        return [(index, engine.scan(io.BytesIO(samples[index][0]))) for index in order]

    with ThreadPoolExecutor(8) as pool:
        results = [verdict for found in pool.map(worker, range(8)) for verdict in found]
    assert len(results) == 240
    for index, verdict in results:
        expected = samples[index][1]
        assert verdict == Verdict(expected is not None, expected, engine_name)


def test_clamd_agrees_with_clamscan(clamd: Clamd, clamav: ClamdEngine, tmp_path: Path) -> None:
    files: dict[str, bytes] = {
        "clean.txt": b"nothing to see\n" * 100,
        "empty": b"",
        "eicar.com": eicar(),
        "eicar-newline.com": eicar() + b"\n",
        "pattern-inside.bin": NOISE[:500_000] + TEST_PATTERN + NOISE[:10],
        "pattern-at-start.txt": TEST_PATTERN + b"\n",
        "pattern-cut.txt": TEST_PATTERN[:-1],
        "true.elf": Path("/bin/true").read_bytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("inner/eicar.com", eicar())
        zipped.writestr("clean.txt", b"clean")
    (tmp_path / "eicar.zip").write_bytes(archive.getvalue())
    paths = sorted(tmp_path.iterdir())

    expected = clamscan_verdicts(paths, clamd.database)
    ours = {}
    for path in paths:
        with open(path, "rb") as f:
            ours[path] = clamav.scan(f).signature
    assert ours == expected
    assert {path.name for path, signature in ours.items() if signature} == {
        "eicar.com",
        "eicar.zip",
        "pattern-inside.bin",
        "pattern-at-start.txt",
    }


def test_clamd_helper_cleans_up_when_the_body_raises(tmp_path: Path) -> None:
    started: list[Clamd] = []
    with pytest.raises(ZeroDivisionError), running_clamd(tmp_path / "c") as clamd:
        started.append(clamd)
        _ = 1 / 0
    (clamd,) = started
    assert clamd.process.returncode is not None
    with pytest.raises(EngineError, match="cannot connect"):
        ClamdEngine(clamd.socket, timeout=1).scan_bytes(b"x")


def test_the_install_script_installs_what_the_clamav_tests_run() -> None:
    """scripts/install.sh (run by setup.sh and by test.sh, hence CI) installs the packages that hold clamd, clamscan
    and sigtool; the tests need nothing else of ClamAV (no service running, no downloaded database)."""
    script = (Path(__file__).parents[2] / "scripts" / "install.sh").read_text()
    listed = script.partition("packages=(")[2].partition("\n)")[0]
    packages = {word for line in listed.splitlines() for word in line.partition("#")[0].split()}
    for command in ("clamd", "clamscan", "sigtool"):
        path = shutil.which(command, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
        assert path is not None, f"{command} is not installed"
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True, check=True)
        package = owner.stdout.partition(":")[0]
        assert package in packages, f"{command} comes from {package}, which scripts/install.sh does not install"
