"""The encryption filter on a real mount over a real loop-backed ext4: no plaintext reaches the device, the key
opens the volume again and a wrong one is refused, and ordinary tools see the same files as on a plain directory.

One mount (``vol``, a KeyFile in the module's directory) serves the tests that only read and write files: the
device test, the tools, the tampering test; each works in a directory of its own. Every test that unmounts,
remounts, kills the daemon or uses another key source has a fresh volume of its own (``fresh``).

The device is read as ``grep`` reads it (``grep -c MARKER /dev/loopN``) after ``sync`` and after the device's
buffer cache is dropped (``blockdev --flushbufs``), so that what is counted is what the device holds now.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random
import re
import secrets
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from filters.encryption.layout import BLOCK_SIZE, NONCE_SIZE, cipher_size, record_offset
from filters.scanner.engines import eicar
from fltfuse import _volume
from fltfuse.testing import MountedVolume, mount, mounted_volume, release, why_no_mount
from tests.scanner_service import CLEAN, Service

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

Run = Callable[..., subprocess.CompletedProcess[str]]  # the ``run`` fixture
Waiter = Callable[..., Any]  # the ``wait_for`` fixture

FLTFUSE = str(Path(sys.executable).with_name("fltfuse"))
DEFAULT_KEYS = Path("/etc/fltfuse/keys")
MARKER = f"PLAINTEXT-MARKER-{secrets.token_hex(8)}"  # new each run: nothing older on any device holds it
SIZES = (0, 1, 4095, 4096, 4097, (1 << 20) + 3)
SPARSE_SIZE = 100 << 20
SPARSE_AT, SPARSE_DATA = 52_428_807, "a little data in the middle of nowhere\n"


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def uncache(fd: int) -> None:
    """Make the next reads of the open file ``fd`` go to the daemon (and so through the filter), not to the
    kernel's page cache: its dirty pages written back, then its pages dropped."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def sha256(path: Path) -> str:
    """The sha256 of the file's contents, read past the page cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        uncache(f.fileno())
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(root: Path, *, times: bool = False) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` by relative path: its mode, a file's size and sha256 or a link's target, and
    (``times``) its modification time."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            what: tuple[object, ...] = (st.st_size, sha256(path))
        elif stat.S_ISLNK(st.st_mode):
            what = (os.readlink(path),)
        else:
            what = ()
        found[str(path.relative_to(root))] = (stat.filemode(st.st_mode), *what, *((st.st_mtime_ns,) if times else ()))
    return found


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def key_file(path: Path) -> Path:
    """A file holding a new random 32-byte key."""
    path.write_bytes(os.urandom(32))
    return path


def with_key(key: Path) -> dict[str, dict[str, str]]:
    return {"encryption": {"KeyFile": str(key)}}


def remount(
    vol: MountedVolume,
    *,
    filters: tuple[str, ...] = ("encryption",),
    parameters: dict[str, dict[str, str]] | None = None,
) -> MountedVolume:
    """Unmount ``vol`` and mount its image again at the same place (``mounted_volume`` releases it at the end)."""
    release(vol.mountpoint, vol.image)
    return mount(vol.image, vol.mountpoint, filters=filters, parameters=parameters, log_file=vol.log_path)


def user_mount(vol: MountedVolume, *args: str) -> subprocess.CompletedProcess[str]:
    """``fltfuse mount IMAGE MNT ARGS`` as a user types it, after unmounting ``vol``; the caller checks the outcome."""
    release(vol.mountpoint, vol.image)
    argv = [FLTFUSE, "mount", f"--log-file={vol.log_path}", vol.image, vol.mountpoint, *args]
    return subprocess.run(argv, capture_output=True, text=True)


def assert_nothing_left(vol: MountedVolume) -> None:
    """No FUSE mount, backing mount, loop device or state file of the volume is there."""
    assert not _volume.is_mounted(vol.mountpoint)
    assert _volume.VolumeState.load(vol.mountpoint) is None
    assert subprocess.run(["losetup", "-j", vol.image], capture_output=True, text=True).stdout == ""
    state_dir = str(_volume.state_root() / _volume.volume_id(vol.mountpoint))
    assert [target for _, target, _, _ in _volume.mounts() if target.startswith(state_dir)] == []


def assert_refused(vol: MountedVolume, *args: str) -> str:
    """``fltfuse mount`` with ``args`` fails saying the key is wrong and leaves nothing behind; its message."""
    done = user_mount(vol, "--filter", "encryption", *args)
    assert done.returncode != 0, done
    assert "wrong key" in done.stderr, done.stderr
    assert_nothing_left(vol)
    return done.stderr


# -- the device -------------------------------------------------------------------------------------------------


def flush_device(vol: MountedVolume) -> str:
    """Write everything back (``sync``) and drop the device's buffer cache; the device."""
    assert vol.loop_device is not None
    subprocess.run(["sync"], check=True)
    subprocess.run(["blockdev", "--flushbufs", vol.loop_device], check=True)
    return vol.loop_device


def grep_count(vol: MountedVolume, text: str) -> int:
    """``grep -c`` of ``text`` on the volume's device: how many of its lines hold it."""
    done = subprocess.run(["grep", "-c", "-a", "-F", text, flush_device(vol)], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return int(done.stdout)


def device_holds(vol: MountedVolume, needle: bytes) -> bool:
    with open(flush_device(vol), "rb") as device:
        return needle in device.read()


def ciphertext_sample(vol: MountedVolume, name: str) -> bytes:
    """64 bytes of a file's ciphertext (from its first record) as the backing ext4 holds them."""
    with open(Path(vol.backing) / name, "rb") as f:
        return os.pread(f.fileno(), 64, record_offset(0) + NONCE_SIZE)


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    """The shared mount: encryption with a key file."""
    directory = tmp_path_factory.mktemp("encryption", numbered=True)
    key = key_file(directory / "volume.key")
    with mounted_volume(directory, size="256M", filters=("encryption",), parameters=with_key(key)) as mounted:
        yield mounted


@pytest.fixture
def place(vol: MountedVolume, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount for the test; the daemon logs no error meanwhile."""
    since = len(vol.log_text())
    directory = Path(vol.mountpoint) / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    directory.mkdir()
    yield directory
    assert vol.errors_logged(since) == []


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A plain directory on the machine's own ext4: what the same tools do there is the reference."""
    path = tmp_path / "plain"
    path.mkdir()
    assert subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout == "ext2/ext3\n"
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Callable[..., contextlib.AbstractContextManager[MountedVolume]]:
    """``fresh(parameters)``: a new 64 MiB volume of the test's own with the encryption filter (its image is
    ``tmp_path/volume/volume.img``)."""

    def volume(parameters: dict[str, dict[str, str]] | None) -> contextlib.AbstractContextManager[MountedVolume]:
        return mounted_volume(tmp_path / "volume", size="64M", filters=("encryption",), parameters=parameters)

    return volume


# -- 1. no plaintext on the device --------------------------------------------------------------------------------


def test_a_marker_written_through_the_mount_never_reaches_the_device(
    vol: MountedVolume, place: Path, tmp_path: Path, run: Run
) -> None:
    line = f"{MARKER}\n".encode()
    expected: dict[str, bytes] = {}

    small = place / "small.txt"
    small.write_bytes(line)
    expected["small.txt"] = line

    big = line * ((3 << 20) // len(line) + 1)  # 3 MiB and a bit, written in odd-sized pieces
    with open(place / "big.txt", "wb") as f:
        at, sizes = 0, (1, 4093, 7, 65537, 4099, 131, 12345)
        while at < len(big):
            at += f.write(big[at : at + sizes[at % len(sizes)]])
    expected["big.txt"] = big

    mapped_size = 3 * BLOCK_SIZE + 100
    with open(place / "mapped.txt", "w+b") as f:
        f.truncate(mapped_size)
        with mmap.mmap(f.fileno(), mapped_size) as m:
            for offset in (0, BLOCK_SIZE - 10, 2 * BLOCK_SIZE + 500, mapped_size - len(line)):
                m[offset : offset + len(line)] = line
            m.flush()
            expected["mapped.txt"] = bytes(m)

    source = tmp_path / "source.txt"
    source.write_bytes(line * 3000)
    run("cp", source, place / "copied.txt")
    expected["copied.txt"] = line * 3000

    (place / "before-rename.txt").write_bytes(line * 5)
    os.rename(place / "before-rename.txt", place / "renamed.txt")
    expected["renamed.txt"] = line * 5

    (place / "link-a.txt").write_bytes(line * 2)
    os.link(place / "link-a.txt", place / "link-b.txt")
    with open(place / "link-b.txt", "ab") as f:
        f.write(line)
    expected["link-a.txt"] = expected["link-b.txt"] = line * 3

    with open(place / "truncated.txt", "w+b") as f:
        f.write(line * 500)  # about 14 KiB
        f.truncate(5000)  # inside block 1
        f.truncate(20000)  # the old end padded with zeros
        f.seek(15000)
        f.write(line)
    expected["truncated.txt"] = (line * 500)[:5000] + bytes(10000) + line + bytes(20000 - 15000 - len(line))

    for name, content in expected.items():  # the plaintext is what the mount shows, and is written back
        path = place / name
        assert path.read_bytes() == content, name
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    assert grep_count(vol, MARKER) == 0
    # The ciphertext is on the device: grep read the data that was written.
    assert device_holds(vol, ciphertext_sample(vol, f"{place.name}/big.txt"))

    # The control: the same marker put straight into the backing ext4, not through the mount, is found.
    control = Path(vol.backing) / "control-plaintext"
    write_durably(control, line)
    try:
        assert grep_count(vol, MARKER) == 1
    finally:
        control.unlink()


# -- 2. the key opens the volume again, a wrong key is refused -----------------------------------------------------


def test_remounting_with_the_key_shows_the_same_files_and_a_wrong_key_file_is_refused(
    fresh: Callable[..., Any], tmp_path: Path
) -> None:
    key = key_file(tmp_path / "raw.key")
    as_hex = tmp_path / "hex.key"
    as_hex.write_text(key.read_bytes().hex() + "\n")  # the same key, in the other format
    wrong = key_file(tmp_path / "wrong.key")
    with fresh(with_key(key)) as vol:
        root = Path(vol.mountpoint)
        (root / "sub" / "deeper").mkdir(parents=True)
        for size in SIZES:
            (root / "sub" / f"f{size}").write_bytes(pattern(size, size))
        (root / "sub" / "deeper" / "text").write_text("text\n" * 999)
        os.symlink("../f4097", root / "sub" / "deeper" / "link")
        written = manifest(root)
        listing = sorted(os.listdir(root))
        assert listing == ["lost+found", "sub"]  # the volume record is not shown

        again = remount(vol, parameters=with_key(as_hex))
        assert manifest(root) == written
        assert sorted(os.listdir(root)) == listing
        assert (root / "sub" / "f4097").stat().st_size == 4097
        assert (Path(again.backing) / "sub" / "f4097").stat().st_size == cipher_size(4097)

        message = assert_refused(vol, "--param", f"encryption.KeyFile={wrong}")
        assert f"{wrong} does not open this volume" in message

        remount(vol, parameters=with_key(key))  # the refused mount changed nothing
        assert manifest(root) == written


# -- 3. the default key ------------------------------------------------------------------------------------------


def volume_uuid(image: str | Path) -> str:
    """The ext4 UUID of an image, as blkid reads it."""
    done = subprocess.run(["blkid", "-s", "UUID", "-o", "value", image], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@contextlib.contextmanager
def default_key_removed(image: Path) -> Iterator[None]:
    """The default key file of ``image``'s volume is removed afterwards, and the directories under /etc the test
    made (if nothing else is in them by then)."""
    made = [path for path in (DEFAULT_KEYS.parent, DEFAULT_KEYS) if not path.exists()]
    try:
        yield
    finally:
        if image.exists():
            (DEFAULT_KEYS / f"{volume_uuid(image)}.key").unlink(missing_ok=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):  # another process's keys may be in it now
                directory.rmdir()


def test_with_no_key_parameters_a_random_key_is_made_in_etc_fltfuse_keys_and_opens_the_volume_again(
    fresh: Callable[..., Any], tmp_path: Path
) -> None:
    with default_key_removed(tmp_path / "volume" / "volume.img"), fresh(None) as vol:
        uuid = volume_uuid(vol.image)
        key = DEFAULT_KEYS / f"{uuid}.key"
        assert key.exists(), sorted(DEFAULT_KEYS.iterdir())
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(DEFAULT_KEYS.stat().st_mode) == 0o700
        assert len(key.read_bytes()) == 32
        assert f"(volume {uuid}) attached, key from {key}" in vol.log_text()
        content = pattern(10_000, 3)
        (Path(vol.mountpoint) / "secret").write_bytes(content)

        done = user_mount(vol, "--filter", "encryption")  # no parameters: the same default key file
        assert done.returncode == 0, done.stderr
        assert (Path(vol.mountpoint) / "secret").read_bytes() == content
        assert [path.name for path in DEFAULT_KEYS.iterdir() if uuid in path.name] == [key.name]


def test_a_key_directory_parameter_keeps_the_random_key_there(fresh: Callable[..., Any], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with fresh({"encryption": {"KeyDirectory": str(keys)}}) as vol:
        (Path(vol.mountpoint) / "secret").write_bytes(b"kept under KeyDirectory")
        assert sorted(keys.iterdir()) == [keys / f"{volume_uuid(vol.image)}.key"]
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        done = user_mount(vol, "--filter", "encryption", "--param", f"encryption.KeyDirectory={keys}")
        assert done.returncode == 0, done.stderr
        assert (Path(vol.mountpoint) / "secret").read_bytes() == b"kept under KeyDirectory"


# -- 4. a passphrase ---------------------------------------------------------------------------------------------


def test_a_passphrase_file_opens_the_volume_again_and_a_wrong_passphrase_is_refused(
    fresh: Callable[..., Any], tmp_path: Path
) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\nthe first line only\n")
    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("correct horse battery stapler\n")
    with fresh({"encryption": {"PassphraseFile": str(passphrase)}}) as vol:
        content = pattern(50_000, 4)
        (Path(vol.mountpoint) / "secret").write_bytes(content)
        remount(vol, parameters={"encryption": {"PassphraseFile": str(passphrase)}})
        assert (Path(vol.mountpoint) / "secret").read_bytes() == content
        message = assert_refused(vol, "--param", f"encryption.PassphraseFile={wrong}")
        assert "the passphrase does not open this volume" in message
        remount(vol, parameters={"encryption": {"Passphrase": "correct horse battery staple"}})
        assert (Path(vol.mountpoint) / "secret").read_bytes() == content


# -- 5. ordinary tools see what they see on a plain directory -----------------------------------------------------


def build_tree(root: Path, run: Run) -> None:
    """The same tree every time, made as a user would: files of the sizes around a block, a directory, a link,
    modes, and a 100 MiB sparse file (``truncate -s 100M`` and a small ``dd``)."""
    (root / "sub" / "deeper").mkdir(parents=True)
    for size in SIZES:
        (root / f"f{size}").write_bytes(pattern(size, size))
    (root / "sub" / "deeper" / "text").write_text("some text\n" * 1234)
    os.chmod(root / "f1", 0o600)
    os.chmod(root / "f4095", 0o755)
    os.symlink("../f4097", root / "sub" / "link")
    run("truncate", "-s", "100M", root / "sparse")
    run("dd", f"of={root / 'sparse'}", "bs=1", f"seek={SPARSE_AT}", "conv=notrunc", "status=none", input=SPARSE_DATA)


def assert_sparse_file(path: Path, backing: Path) -> None:
    """The sparse file: 100 MiB, zeros but for its data, and sparse on the backing ext4 too."""
    assert path.stat().st_size == SPARSE_SIZE
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 1 << 20, 0) == bytes(1 << 20)
        assert os.pread(f.fileno(), 4096, SPARSE_AT - 4000) == bytes(4000) + SPARSE_DATA.encode() + bytes(57)
        assert os.pread(f.fileno(), 1 << 20, SPARSE_SIZE - (1 << 20)) == bytes(1 << 20)
    assert backing.stat().st_size == cipher_size(SPARSE_SIZE)
    assert backing.stat().st_blocks * 512 < 1 << 20


def test_a_tree_made_with_tools_on_the_mount_is_the_tree_they_make_on_a_plain_directory(
    vol: MountedVolume, place: Path, plain: Path, run: Run
) -> None:
    build_tree(place / "made", run)
    build_tree(plain / "made", run)
    assert manifest(place / "made") == manifest(plain / "made")
    assert_sparse_file(place / "made" / "sparse", Path(vol.backing) / place.name / "made" / "sparse")


def test_cp_a_in_and_out_and_a_tar_round_trip_keep_the_tree(
    vol: MountedVolume, place: Path, plain: Path, tmp_path: Path, run: Run
) -> None:
    source = plain / "source"
    build_tree(source, run)
    expected = manifest(source, times=True)
    run("cp", "-a", source, place / "copy")
    assert manifest(place / "copy", times=True) == expected
    assert_sparse_file(place / "copy" / "sparse", Path(vol.backing) / place.name / "copy" / "sparse")
    run("cp", "-a", place / "copy", plain / "back")
    assert manifest(plain / "back", times=True) == expected

    archive = tmp_path / "tree.tar"
    run("tar", "-C", source, "--format=posix", "-cf", archive, ".")  # posix: times to the nanosecond
    (place / "untarred").mkdir()
    run("tar", "-C", place / "untarred", "-xf", archive)
    assert manifest(place / "untarred", times=True) == expected
    run("tar", "-C", place / "untarred", "--compare", "-f", archive)  # tar's own check, file by file
    again = tmp_path / "again.tar"
    run("tar", "-C", place / "untarred", "--format=posix", "-cf", again, ".")
    (plain / "untarred").mkdir()
    run("tar", "-C", plain / "untarred", "-xf", again)
    assert manifest(plain / "untarred", times=True) == expected


def sqlite_workload(path: Path) -> list[Any]:
    """Create, insert 2000 rows in transactions, update, delete, vacuum; reopen and query. What it saw."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB, n INTEGER)")
    rng = random.Random(5)
    for start in range(0, 2000, 250):
        with db:
            db.executemany(
                "INSERT INTO t VALUES (?, ?, ?, ?)",
                [(i, f"row {i}", rng.randbytes(rng.randrange(10, 3000)), i * 7) for i in range(start, start + 250)],
            )
    with db:
        db.execute("UPDATE t SET n = n + 1, name = name || ' updated' WHERE id % 3 = 0")
        db.execute("DELETE FROM t WHERE id % 5 = 0")
    db.execute("VACUUM")
    db.close()
    db = sqlite3.connect(path)
    try:
        return [
            db.execute("PRAGMA integrity_check").fetchall(),
            db.execute("SELECT count(*), sum(n), sum(length(blob)) FROM t").fetchall(),
            db.execute("SELECT id, name, hex(blob) FROM t WHERE id IN (3, 999, 1998) ORDER BY id").fetchall(),
        ]
    finally:
        db.close()


def test_sqlite_on_the_mount_sees_what_it_sees_on_a_plain_directory(place: Path, plain: Path) -> None:
    on_mount = sqlite_workload(place / "test.db")
    assert on_mount[0] == [("ok",)]
    assert on_mount == sqlite_workload(plain / "test.db")
    assert (place / "test.db").read_bytes() == (plain / "test.db").read_bytes()


def git_workload(root: Path, run: Run, home: Path) -> list[str]:
    """init, add, commit twice (fixed author and dates), gc, fsck; the commit ids and the tree's listing."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "A U Thor",
        "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "C O Mitter",
        "GIT_COMMITTER_EMAIL": "committer@example.com",
        "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
    }

    def git(*args: str) -> str:
        return run("git", *args, cwd=root, env=env).stdout

    root.mkdir()
    git("init", "-q", "-b", "main")
    for size in SIZES:
        (root / f"f{size}").write_bytes(pattern(size, size + 1))
    git("add", ".")
    git("commit", "-q", "-m", "first")
    (root / "f4097").write_bytes(pattern(9000, 9))
    (root / "f1").unlink()
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    git("gc", "-q")
    git("fsck", "--full", "--strict")
    assert git("status", "--porcelain") == ""
    return [git("rev-parse", "HEAD", "HEAD~1"), git("ls-tree", "-r", "-l", "HEAD~1"), git("show", "HEAD:f4097")]


def test_git_on_the_mount_makes_the_same_commits_as_on_a_plain_directory(
    place: Path, plain: Path, tmp_path: Path, run: Run
) -> None:
    assert git_workload(place / "repo", run, tmp_path) == git_workload(plain / "repo", run, tmp_path)


def test_dd_with_odd_block_sizes_and_seeks_writes_what_it_writes_on_a_plain_directory(
    place: Path, plain: Path, tmp_path: Path, run: Run
) -> None:
    source = tmp_path / "source"
    source.write_bytes(pattern(30_000, 6))
    for root in (place, plain):
        (root / "into").write_bytes(pattern(10_000, 7))
        run("dd", f"if={source}", f"of={root / 'into'}", "bs=513", "seek=5", "count=9", "conv=notrunc", "status=none")
        run("dd", f"if={source}", f"of={root / 'past-end'}", "bs=513", "seek=30", "status=none")
        (root / "cut").write_bytes(pattern(50_000, 8))
        run("dd", f"if={source}", f"of={root / 'cut'}", "bs=513", "seek=3", "count=2", "status=none")  # truncates
        run("dd", f"if={root / 'into'}", f"of={root / 'read-back'}", "bs=513", "skip=3", "status=none")
    assert manifest(place) == manifest(plain)
    assert (place / "past-end").stat().st_size == 30 * 513 + 30_000


def test_a_file_written_and_read_through_mmap_matches_a_plain_directory(place: Path, plain: Path) -> None:
    size = 5 * BLOCK_SIZE + 77
    seen = []
    for root in (place, plain):
        (root / "mapped").write_bytes(pattern(size, 10))
        with open(root / "mapped", "r+b") as f, mmap.mmap(f.fileno(), size) as m:
            for offset in (0, BLOCK_SIZE - 3, 3 * BLOCK_SIZE + 100, size - 50):
                m[offset : offset + 50] = pattern(50, offset)
            m.flush()
        with open(root / "mapped", "rb") as reader:
            uncache(reader.fileno())
            with mmap.mmap(reader.fileno(), size, prot=mmap.PROT_READ) as m:
                seen.append(bytes(m))
        assert (root / "mapped").read_bytes() == seen[-1]
    assert seen[0] == seen[1]


def test_a_hard_link_reads_what_was_written_through_the_other_name(place: Path) -> None:
    first, second = place / "first", place / "second"
    first.write_bytes(pattern(6000, 11))
    os.link(first, second)
    with open(second, "r+b") as f:
        f.seek(4000)
        f.write(pattern(5000, 12))  # across a block, past the end
        uncache(f.fileno())
    expected = pattern(6000, 11)[:4000] + pattern(5000, 12)
    assert first.read_bytes() == expected
    assert first.stat().st_size == second.stat().st_size == 9000
    assert first.stat().st_nlink == 2
    first.unlink()
    assert second.read_bytes() == expected


def test_renaming_over_an_open_file_leaves_the_open_file_readable(place: Path, plain: Path) -> None:
    seen = []
    for root in (place, plain):
        (root / "old").write_bytes(pattern(20_000, 13))
        (root / "new").write_bytes(pattern(7000, 14))
        fd = os.open(root / "old", os.O_RDONLY)
        try:
            os.rename(root / "new", root / "old")
            uncache(fd)
            # Read from the middle first: the filter must learn of a file whose name is gone.
            seen.append((os.pread(fd, 9000, 5000), os.pread(fd, 30_000, 0), (root / "old").read_bytes()))
        finally:
            os.close(fd)
    assert seen[0] == seen[1]
    assert seen[0][1] == pattern(20_000, 13)


# -- 6. the scanner above the encryption filter scans plaintext ---------------------------------------------------


def test_the_scanner_above_the_encryption_filter_finds_the_eicar_file_it_reads_in_plaintext(
    fresh: Callable[..., Any], tmp_path: Path, wait_for: Waiter
) -> None:
    test_file = eicar()
    key = key_file(tmp_path / "volume.key")
    with fresh(with_key(key)) as vol:
        write_durably(Path(vol.mountpoint) / "eicar.com", test_file)
        write_durably(Path(vol.mountpoint) / "clean.txt", CLEAN)
        parameters = {"scanner": {"Policy": "deny", "ScanTimeout": "10000"}, **with_key(key)}
        remount(vol, filters=("scanner", "encryption"), parameters=parameters)
        assert "attached scanner/Scanner Instance at altitude 265000" in vol.log_text()
        service = Service.start(["--volume", vol.mountpoint], tmp_path / "service.log")
        try:
            connected = f"scanner: service fltfuse-scanner (pid {service.pid}) connected"
            wait_for(lambda: connected in vol.log_text() or service.process.poll() is not None, "the service")
            assert connected in vol.log_text(), service.log_text()
            cat = subprocess.run(["cat", Path(vol.mountpoint) / "eicar.com"], capture_output=True, timeout=60)
            assert cat.returncode != 0 and b"Permission denied" in cat.stderr and cat.stdout == b""
            with pytest.raises(PermissionError):
                (Path(vol.mountpoint) / "eicar.com").read_bytes()
            clean = subprocess.run(["cat", Path(vol.mountpoint) / "clean.txt"], capture_output=True, timeout=60)
            assert clean.stdout == CLEAN
            assert service.verdicts() == ["INFECTED open /eicar.com: EICAR-Test-File", "clean open /clean.txt"]
        finally:
            service.stop()
        assert grep_count(vol, "EICAR-STANDARD-ANTIVIRUS") == 0
        assert device_holds(vol, ciphertext_sample(vol, "eicar.com"))


# -- 7. durability ----------------------------------------------------------------------------------------------


def test_data_fsynced_through_the_mount_survives_kill_9_of_the_daemon(
    fresh: Callable[..., Any], tmp_path: Path
) -> None:
    key = key_file(tmp_path / "volume.key")
    with fresh(with_key(key)) as vol:
        root = Path(vol.mountpoint)
        expected = {"whole": pattern(3 * BLOCK_SIZE, 15), "partial": pattern(10_001, 16)}
        for name, content in expected.items():
            write_durably(root / name, content)
        (root / "dir").mkdir()
        with open(root / "dir" / "pieces", "wb") as f:  # written in pieces, overwritten inside, fsynced each time
            for piece in range(5):
                f.write(pattern(3001, piece))
                os.fsync(f.fileno())
            f.seek(2000)
            f.write(b"overwritten in place")
            os.fsync(f.fileno())
        pieces = bytearray(b"".join(pattern(3001, piece) for piece in range(5)))
        pieces[2000:2020] = b"overwritten in place"
        expected["dir/pieces"] = bytes(pieces)
        for directory in (root, root / "dir"):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        vol.kill()
        with pytest.raises(OSError) as info:
            os.listdir(root)
        assert info.value.errno == errno.ENOTCONN
        unmount = subprocess.run([FLTFUSE, "unmount", vol.mountpoint], capture_output=True, text=True)
        assert unmount.returncode == 0, unmount.stderr
        assert_nothing_left(vol)
        remount(vol, parameters=with_key(key))
        for name, content in expected.items():
            assert (root / name).stat().st_size == len(content), name
            assert (root / name).read_bytes() == content, name


# -- 8. tampering ------------------------------------------------------------------------------------------------


def test_a_record_changed_on_the_device_fails_to_read_with_eio_and_the_others_read(vol: MountedVolume) -> None:
    since = len(vol.log_text())
    directory = Path(vol.mountpoint) / "tampered"
    directory.mkdir()
    path = directory / "file"
    content = pattern(4 * BLOCK_SIZE + 100, 17)
    write_durably(path, content)
    inode = path.stat().st_ino
    backing = Path(vol.backing) / "tampered" / "file"
    assert backing.stat().st_ino == inode
    with open(backing, "r+b") as f:  # flip one byte of block 2's ciphertext
        at = record_offset(2) + NONCE_SIZE + 100
        (byte,) = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([byte ^ 0x01]), at)
        os.fsync(f.fileno())
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # and no page of it stays in the mount's page cache
        with pytest.raises(OSError) as info:
            os.pread(fd, BLOCK_SIZE, 2 * BLOCK_SIZE)
        assert info.value.errno == errno.EIO
        for index in (0, 1, 3, 4):
            start = index * BLOCK_SIZE
            assert os.pread(fd, BLOCK_SIZE, start) == content[start : start + BLOCK_SIZE], index
        with pytest.raises(OSError) as info:
            os.pread(fd, 100, 2 * BLOCK_SIZE + 4000)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == errno.EIO
    errors = vol.errors_logged(since)
    assert errors, "the daemon logged nothing"
    assert all(f"encryption: inode {inode}: block 2 failed its authentication check" in line for line in errors), errors
