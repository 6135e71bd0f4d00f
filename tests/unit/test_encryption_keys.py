"""The encryption filter's keys (filters/encryption/keys.py): the volume record, the key sources, and each refusal.

Each test works on a backing directory and a key directory of its own under tmp_path (never /etc/fltfuse/keys).
The ext4 UUID test makes a small image file with mkfs.ext4, which needs no root.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from filters.encryption.keys import (
    DEFAULT_KEY_DIRECTORY,
    KEY_SIZE,
    RECORD_NAME,
    SCRYPT,
    KeyProblem,
    KeySettings,
    open_volume_key,
    volume_uuid,
)
from filters.encryption.layout import BLOCK_SIZE


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    directory = tmp_path / "backing"
    directory.mkdir()
    return directory


def key_file(path: Path, seed: int, *, hex_digits: bool = False) -> Path:
    key = random.Random(seed).randbytes(KEY_SIZE)
    path.write_bytes(key.hex().encode() + b"\n" if hex_digits else key)
    return path


def record_of(backing: Path) -> dict[str, object]:
    parsed: dict[str, object] = json.loads((backing / RECORD_NAME).read_text())
    return parsed


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- a new volume ----------------------------------------------------------------------------------------


def test_a_new_volume_gets_its_record_and_a_random_key_file_named_by_its_uuid(backing: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys" / "nested"  # made with its parents
    opened = open_volume_key(str(backing), None, KeySettings(key_directory=str(keys)))
    record = record_of(backing)
    assert set(record) == {"format", "cipher", "block_size", "volume", "source", "check"}
    assert (record["format"], record["cipher"], record["block_size"], record["source"]) == (
        1,
        "AES-256-GCM",
        BLOCK_SIZE,
        "key file",
    )
    assert str(uuid.UUID(str(record["volume"]))) == record["volume"] == opened.volume
    assert len(bytes.fromhex(str(record["check"]))) == 12 + len(b"fltfuse-encryption key check") + 16
    path = keys / f"{opened.volume}.key"
    assert os.listdir(keys) == [path.name]
    assert (mode_of(keys), mode_of(path), len(path.read_bytes())) == (0o700, 0o600, KEY_SIZE)
    assert (opened.origin, len(opened.content_key)) == (str(path), KEY_SIZE)
    assert opened.content_key != path.read_bytes()  # derived from the key with the volume UUID
    assert sorted(os.listdir(backing)) == [RECORD_NAME]  # written atomically: no partial file left
    assert mode_of(backing / RECORD_NAME) == 0o600


def test_reopening_with_the_same_settings_gives_the_same_content_key(backing: Path, tmp_path: Path) -> None:
    settings = KeySettings(key_directory=str(tmp_path / "keys"))
    first = open_volume_key(str(backing), None, settings)
    record = (backing / RECORD_NAME).read_bytes()
    again = open_volume_key(str(backing), "/dev/null", settings)  # the record's UUID wins over any device
    assert again == first
    assert (backing / RECORD_NAME).read_bytes() == record  # reopening does not rewrite it
    assert os.listdir(tmp_path / "keys") == [f"{first.volume}.key"]


def test_the_same_key_gives_each_volume_its_own_content_key(tmp_path: Path) -> None:
    key = key_file(tmp_path / "k", seed=1)
    opened = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        opened.append(open_volume_key(str(tmp_path / name), None, KeySettings(key_file=str(key))))
    assert opened[0].volume != opened[1].volume
    assert opened[0].content_key != opened[1].content_key


def test_lost_and_found_does_not_make_a_volume_non_empty(backing: Path, tmp_path: Path) -> None:
    (backing / "lost+found").mkdir()
    opened = open_volume_key(str(backing), None, KeySettings(key_file=str(key_file(tmp_path / "k", seed=1))))
    assert record_of(backing)["volume"] == opened.volume


@pytest.mark.parametrize("count", [1, 2, 7])
def test_a_volume_with_files_and_no_record_is_refused_naming_them(backing: Path, tmp_path: Path, count: int) -> None:
    names = [f"file-{i}" for i in range(count)]
    for name in names:
        (backing / name).write_bytes(b"plain")
    (backing / "lost+found").mkdir()
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(key_directory=str(tmp_path / "keys")))
    shown = ", ".join(names[:5]) + (" ..." if count > 5 else "")
    assert str(info.value) == (
        f"the volume already holds files ({shown}) and no {RECORD_NAME}: encryption starts on an empty volume"
    )
    assert sorted(os.listdir(backing)) == sorted([*names, "lost+found"])  # nothing written
    assert not (tmp_path / "keys").exists()  # no key made either


# -- key files -------------------------------------------------------------------------------------------


def test_a_different_key_file_is_a_wrong_key(backing: Path, tmp_path: Path) -> None:
    right, wrong = key_file(tmp_path / "right", seed=1), key_file(tmp_path / "wrong", seed=2)
    opened = open_volume_key(str(backing), None, KeySettings(key_file=str(right)))
    assert (record_of(backing)["source"], opened.origin) == ("key file", str(right))
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(key_file=str(wrong)))
    assert str(info.value) == f"wrong key: {wrong} does not open this volume (its key check failed)"


def test_a_random_key_volume_refuses_another_key_file_and_opens_with_its_own(backing: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    opened = open_volume_key(str(backing), None, KeySettings(key_directory=str(keys)))
    with pytest.raises(KeyProblem, match=r"^wrong key: "):
        open_volume_key(str(backing), None, KeySettings(key_file=str(key_file(tmp_path / "k", seed=3))))
    own = keys / f"{opened.volume}.key"
    assert open_volume_key(str(backing), None, KeySettings(key_file=str(own))).content_key == opened.content_key


def test_a_random_key_volume_whose_key_file_is_missing_says_where_it_should_be(backing: Path, tmp_path: Path) -> None:
    opened = open_volume_key(str(backing), None, KeySettings(key_directory=str(tmp_path / "keys")))
    elsewhere = tmp_path / "other-keys"
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(key_directory=str(elsewhere)))
    assert str(info.value).startswith(f"this volume's key is the random key file {elsewhere}/{opened.volume}.key")
    assert "encryption.KeyFile" in str(info.value)
    assert not elsewhere.exists()  # not made for an existing volume


def test_a_key_file_holds_32_raw_bytes_or_64_hex_digits(backing: Path, tmp_path: Path) -> None:
    raw = key_file(tmp_path / "raw", seed=4)
    hexed = key_file(tmp_path / "hex", seed=4, hex_digits=True)
    assert len(raw.read_bytes()) == 32 and len(hexed.read_bytes()) == 65
    opened = open_volume_key(str(backing), None, KeySettings(key_file=str(raw)))
    assert open_volume_key(str(backing), None, KeySettings(key_file=str(hexed))).content_key == opened.content_key
    upper = tmp_path / "upper"
    upper.write_bytes(b"  " + hexed.read_bytes().strip().upper() + b"\r\n")
    assert open_volume_key(str(backing), None, KeySettings(key_file=str(upper))).content_key == opened.content_key


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(31),
        bytes(33),
        b"ab" * 31 + b"\n",  # 62 hex digits
        b"zz" * 32,  # 64 characters, not hex
        b"\xff" * 64,  # 64 bytes, not ASCII
        b"ab" * 33,
    ],
)
def test_a_malformed_key_file_is_refused_naming_it(backing: Path, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(key_file=str(bad)))
    assert str(info.value) == (
        f"the key file {bad} holds {len(content)} bytes: it must hold a 32-byte key, raw or in hex"
    )
    assert os.listdir(backing) == []  # no record for a volume that got no key


def test_a_missing_key_file_is_refused_naming_it(backing: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(key_file=str(missing)))
    assert str(info.value) == f"cannot read the key file {missing}: No such file or directory"


# -- passphrases -----------------------------------------------------------------------------------------


def test_a_passphrase_volume_opens_with_its_passphrase_or_a_file_holding_it(backing: Path, tmp_path: Path) -> None:
    opened = open_volume_key(str(backing), None, KeySettings(passphrase="correct horse"))
    record = record_of(backing)
    assert (record["source"], record["scrypt"], len(bytes.fromhex(str(record["salt"])))) == ("passphrase", SCRYPT, 16)
    assert opened.origin == "the passphrase"
    assert open_volume_key(str(backing), None, KeySettings(passphrase="correct horse")) == opened
    phrase_file = tmp_path / "phrase"
    phrase_file.write_bytes(b"correct horse\nthe second line is not part of it\n")
    assert open_volume_key(str(backing), None, KeySettings(passphrase_file=str(phrase_file))) == opened
    phrase_file.write_bytes(b"correct horse")  # no newline
    assert open_volume_key(str(backing), None, KeySettings(passphrase_file=str(phrase_file))) == opened


def test_a_passphrase_volume_refuses_a_wrong_or_missing_passphrase(backing: Path, tmp_path: Path) -> None:
    open_volume_key(str(backing), None, KeySettings(passphrase="correct horse"))
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(passphrase="correct horse "))
    assert str(info.value) == "wrong key: the passphrase does not open this volume (its key check failed)"
    for settings in (KeySettings(), KeySettings(key_file=str(key_file(tmp_path / "k", seed=5)))):
        with pytest.raises(KeyProblem) as info:
            open_volume_key(str(backing), None, settings)
        assert str(info.value) == "this volume's key is a passphrase: give encryption.Passphrase or PassphraseFile"


def test_a_key_file_volume_refuses_a_passphrase(backing: Path, tmp_path: Path) -> None:
    open_volume_key(str(backing), None, KeySettings(key_file=str(key_file(tmp_path / "k", seed=6))))
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(passphrase="anything"))
    assert str(info.value) == "this volume's key is a key file, not a passphrase: give encryption.KeyFile, or nothing"


def test_a_passphrase_file_that_is_empty_or_missing_is_refused_naming_it(backing: Path, tmp_path: Path) -> None:
    phrase_file = tmp_path / "phrase"
    for content in (b"", b"\nthe passphrase on line 2\n"):
        phrase_file.write_bytes(content)
        with pytest.raises(KeyProblem) as info:
            open_volume_key(str(backing), None, KeySettings(passphrase_file=str(phrase_file)))
        assert str(info.value) == f"the passphrase file {phrase_file} is empty"
    phrase_file.unlink()
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, KeySettings(passphrase_file=str(phrase_file)))
    assert str(info.value) == f"cannot read the passphrase file {phrase_file}: No such file or directory"
    assert os.listdir(backing) == []


# -- settings --------------------------------------------------------------------------------------------


def test_settings_come_from_the_filter_parameters() -> None:
    assert KeySettings.from_parameters({}) == KeySettings("", "", "", DEFAULT_KEY_DIRECTORY)
    assert KeySettings.from_parameters({"KeyDirectory": ""}).key_directory == DEFAULT_KEY_DIRECTORY  # the INF's ""
    given = KeySettings.from_parameters({"KeyFile": "/k", "Passphrase": "", "KeyDirectory": "/d"})
    assert given == KeySettings("/k", "", "", "/d")
    assert (given.source, KeySettings(passphrase_file="/p").source, KeySettings().source) == (
        "key file",
        "passphrase",
        "key file",
    )


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"KeyFile": "/k", "Passphrase": "p"}, "KeyFile and Passphrase"),
        ({"KeyFile": "/k", "PassphraseFile": "/p"}, "KeyFile and PassphraseFile"),
        ({"Passphrase": "p", "PassphraseFile": "/p"}, "Passphrase and PassphraseFile"),
        ({"KeyFile": "/k", "Passphrase": "p", "PassphraseFile": "/p"}, "KeyFile and Passphrase and PassphraseFile"),
    ],
)
def test_more_than_one_key_source_is_refused(parameters: dict[str, str], named: str) -> None:
    with pytest.raises(KeyProblem) as info:
        KeySettings.from_parameters(parameters)
    assert str(info.value) == f"give one key source, not {named}"


# -- malformed records -----------------------------------------------------------------------------------


def good_record(backing: Path, tmp_path: Path) -> tuple[dict[str, object], KeySettings]:
    settings = KeySettings(key_file=str(key_file(tmp_path / "k", seed=7)))
    open_volume_key(str(backing), None, settings)
    return record_of(backing), settings


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: "not json {", " is not a valid volume record (JSONDecodeError("),
        (lambda r: "[1, 2]", " is not a valid volume record (TypeError("),
        (lambda r: {k: v for k, v in r.items() if k != "check"}, " is not a valid volume record (KeyError('check'))"),
        (lambda r: {k: v for k, v in r.items() if k != "volume"}, " is not a valid volume record (KeyError('volume'))"),
        (lambda r: {**r, "check": "not hex"}, " is not a valid volume record (ValueError("),
        (lambda r: {**r, "format": 2}, ": format 2, AES-256-GCM, 16384-byte blocks is not what this filter reads"),
        (lambda r: {**r, "cipher": "XTS"}, ": format 1, XTS, 16384-byte blocks is not what this filter reads"),
        (lambda r: {**r, "block_size": 4096}, ": format 1, AES-256-GCM, 4096-byte blocks is not what this"),
    ],
)
def test_a_malformed_record_is_refused_naming_it(
    backing: Path, tmp_path: Path, change: Callable[[dict[str, object]], object], problem: str
) -> None:
    record, settings = good_record(backing, tmp_path)
    changed = change(record)
    (backing / RECORD_NAME).write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(KeyProblem) as info:
        open_volume_key(str(backing), None, settings)
    assert str(info.value).startswith(f"{backing / RECORD_NAME}{problem}")


def test_a_record_whose_check_was_changed_is_a_wrong_key(backing: Path, tmp_path: Path) -> None:
    record, settings = good_record(backing, tmp_path)
    check = bytearray.fromhex(str(record["check"]))
    check[-1] ^= 0x80
    (backing / RECORD_NAME).write_text(json.dumps({**record, "check": check.hex()}))
    with pytest.raises(KeyProblem, match=r"^wrong key: "):
        open_volume_key(str(backing), None, settings)


def test_a_record_moved_to_another_volume_uuid_is_a_wrong_key(backing: Path, tmp_path: Path) -> None:
    """The check is sealed with the volume's UUID: a record edited to claim another volume does not open."""
    record, settings = good_record(backing, tmp_path)
    (backing / RECORD_NAME).write_text(json.dumps({**record, "volume": str(uuid.UUID(int=1))}))
    with pytest.raises(KeyProblem, match=r"^wrong key: "):
        open_volume_key(str(backing), None, settings)


# -- the volume UUID -------------------------------------------------------------------------------------


def test_volume_uuid_reads_an_ext4_superblock(tmp_path: Path) -> None:
    image = tmp_path / "ext4.img"
    with image.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    chosen = str(uuid.UUID(bytes=random.Random(8).randbytes(16), version=4))
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-F", "-q", "-U", chosen, str(image)], check=True, capture_output=True)
    blkid = shutil.which("blkid") or "/sbin/blkid"
    shown = subprocess.run(
        [blkid, "-p", "-s", "UUID", "-o", "value", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert volume_uuid(str(image)) == shown == chosen
    # and a volume on that device takes it as its UUID
    (tmp_path / "backing").mkdir()
    opened = open_volume_key(str(tmp_path / "backing"), str(image), KeySettings(key_directory=str(tmp_path / "keys")))
    assert opened.volume == chosen and (tmp_path / "keys" / f"{chosen}.key").exists()


def test_volume_uuid_falls_back_to_a_random_uuid_without_an_ext4_device(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(4096))
    short = tmp_path / "short.img"
    short.write_bytes(bytes(1500))
    unreadable = [None, "", str(tmp_path / "missing"), str(zeros), str(short)]
    seen = {volume_uuid(device) for device in unreadable}
    assert len(seen) == len(unreadable)  # each a new one
    assert all(uuid.UUID(u).version == 4 for u in seen)
