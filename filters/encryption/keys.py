"""The volume key: where it comes from, and the record on the volume that tells a right key from a wrong one.

Key sources (the filter's parameters, ``--param encryption.KEY=VALUE``):

* ``KeyFile``: a file holding the 32-byte key, raw or as 64 hex digits.
* ``Passphrase`` or ``PassphraseFile`` (its first line): the key is derived
  with scrypt (n = 2^15, r = 8, p = 1) and a random salt kept on the volume.
* Neither: a random key file ``KeyDirectory/<volume UUID>.key`` (default
  directory ``/etc/fltfuse/keys``, mode 0700, the file 0600), made on the
  first mount and used by every later one.

The volume record ``.fltfuse-encryption`` (JSON, at the root of the backing
file system, hidden from the mount) keeps the format, the volume's UUID (the
ext4 UUID when the volume is a block device, else a random one), the key's
source, the passphrase's salt and scrypt parameters, and a key check: a
constant sealed with the content key. A key that does not open the check is
refused before anything is read or written with it.

The content key is HKDF-SHA256 of the key with the volume UUID, so the same
key file on two volumes gives two content keys.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .layout import BLOCK_SIZE

RECORD_NAME = ".fltfuse-encryption"
DEFAULT_KEY_DIRECTORY = "/etc/fltfuse/keys"
KEY_SIZE = 32
FORMAT = 1
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_CHECK = b"fltfuse-encryption key check"


class KeyProblem(Exception):
    """No usable key, or no usable volume record: the message says what is wrong and what to give."""


@dataclass(frozen=True)
class KeySettings:
    """The filter's key parameters."""

    key_file: str = ""
    passphrase: str = ""
    passphrase_file: str = ""
    key_directory: str = DEFAULT_KEY_DIRECTORY

    @classmethod
    def from_parameters(cls, parameters: Any) -> KeySettings:
        settings = cls(
            str(parameters.get("KeyFile", "") or ""),
            str(parameters.get("Passphrase", "") or ""),
            str(parameters.get("PassphraseFile", "") or ""),
            str(parameters.get("KeyDirectory", "") or DEFAULT_KEY_DIRECTORY),
        )
        given = [
            name
            for name, value in (
                ("KeyFile", settings.key_file),
                ("Passphrase", settings.passphrase),
                ("PassphraseFile", settings.passphrase_file),
            )
            if value
        ]
        if len(given) > 1:
            raise KeyProblem(f"give one key source, not {' and '.join(given)}")
        return settings

    @property
    def source(self) -> str:
        return "passphrase" if self.passphrase or self.passphrase_file else "key file"


def volume_uuid(device: str | None) -> str:
    """The ext4 UUID of ``device`` (read from its superblock), or a new random UUID without one."""
    if device:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                superblock = os.pread(fd, 1024, 1024)
            finally:
                os.close(fd)
            if len(superblock) == 1024 and superblock[0x38:0x3A] == b"\x53\xef":  # ext2/3/4 magic
                return str(uuid.UUID(bytes=superblock[0x68:0x78]))
    return str(uuid.uuid4())


def _read_key_file(path: str) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read the key file {path}: {exc.strerror}") from None
    text = raw.strip()
    if len(raw) == KEY_SIZE:
        return raw
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyProblem(f"the key file {path} holds {len(raw)} bytes: it must hold a {KEY_SIZE}-byte key, raw or in hex")


def _passphrase(settings: KeySettings) -> bytes:
    if settings.passphrase:
        return settings.passphrase.encode()
    try:
        lines = Path(settings.passphrase_file).read_bytes().splitlines()
    except OSError as exc:
        raise KeyProblem(f"cannot read the passphrase file {settings.passphrase_file}: {exc.strerror}") from None
    if not lines or not lines[0]:
        raise KeyProblem(f"the passphrase file {settings.passphrase_file} is empty")
    return lines[0]


def _scrypt(passphrase: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    return Scrypt(salt=salt, length=KEY_SIZE, n=params["n"], r=params["r"], p=params["p"]).derive(passphrase)


def _content_key(key: bytes, volume: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=volume.encode(), info=b"fltfuse-encryption content")
    return hkdf.derive(key)


def _default_key(settings: KeySettings, volume: str, *, create: bool) -> tuple[bytes, str]:
    directory = Path(settings.key_directory)
    path = directory / f"{volume}.key"
    if create and not path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
    elif not path.exists():
        raise KeyProblem(
            f"this volume's key is the random key file {path}, which does not exist "
            "(made on another machine? give encryption.KeyFile)"
        )
    return _read_key_file(str(path)), str(path)


@dataclass(frozen=True)
class VolumeKey:
    """The content key of a volume, and where its key came from (for the log)."""

    content_key: bytes
    volume: str
    origin: str


def open_volume_key(backing: str, device: str | None, settings: KeySettings) -> VolumeKey:
    """The content key of the volume at ``backing``: from its record, or a new record for a new volume.

    Raises KeyProblem for a wrong key, a missing key, a malformed record, or a
    volume that already holds files but no record (its files are not ours).
    """
    record_path = Path(backing) / RECORD_NAME
    try:
        record_text = record_path.read_text()
    except FileNotFoundError:
        return _new_volume(Path(backing), device, settings)
    try:
        record = json.loads(record_text)
        if record["format"] != FORMAT or record["cipher"] != "AES-256-GCM" or record["block_size"] != BLOCK_SIZE:
            shown = f"format {record['format']}, {record['cipher']}, {record['block_size']}-byte blocks"
            raise KeyProblem(f"{record_path}: {shown} is not what this filter reads")
        volume, source, check = str(record["volume"]), str(record["source"]), bytes.fromhex(record["check"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyProblem(f"{record_path} is not a valid volume record ({exc!r})") from None
    if source == "passphrase":
        if settings.source != "passphrase":
            raise KeyProblem("this volume's key is a passphrase: give encryption.Passphrase or PassphraseFile")
        key = _scrypt(_passphrase(settings), bytes.fromhex(record["salt"]), record["scrypt"])
        origin = "the passphrase"
    elif settings.source == "passphrase":
        raise KeyProblem("this volume's key is a key file, not a passphrase: give encryption.KeyFile, or nothing")
    elif settings.key_file:
        key, origin = _read_key_file(settings.key_file), settings.key_file
    else:
        key, origin = _default_key(settings, volume, create=False)
    content_key = _content_key(key, volume)
    try:
        AESGCM(content_key).decrypt(check[:12], check[12:], volume.encode())
    except InvalidTag:
        raise KeyProblem(f"wrong key: {origin} does not open this volume (its key check failed)") from None
    return VolumeKey(content_key, volume, origin)


def _new_volume(backing: Path, device: str | None, settings: KeySettings) -> VolumeKey:
    present = sorted(name for name in os.listdir(backing) if name != "lost+found")
    if present:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise KeyProblem(
            f"the volume already holds files ({shown}) and no {RECORD_NAME}: encryption starts on an empty volume"
        )
    volume = volume_uuid(device)
    record: dict[str, Any] = {"format": FORMAT, "cipher": "AES-256-GCM", "block_size": BLOCK_SIZE, "volume": volume}
    if settings.source == "passphrase":
        salt = os.urandom(16)
        key = _scrypt(_passphrase(settings), salt, SCRYPT)
        record.update(source="passphrase", salt=salt.hex(), scrypt=SCRYPT)
        origin = "the passphrase"
    elif settings.key_file:
        key, origin = _read_key_file(settings.key_file), settings.key_file
        record["source"] = "key file"
    else:
        key, origin = _default_key(settings, volume, create=True)
        record["source"] = "key file"
    content_key = _content_key(key, volume)
    nonce = os.urandom(12)
    record["check"] = (nonce + AESGCM(content_key).encrypt(nonce, _CHECK, volume.encode())).hex()
    _write_atomically(backing / RECORD_NAME, json.dumps(record, indent=1) + "\n")
    return VolumeKey(content_key, volume, origin)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, stat.S_IRUSR | stat.S_IWUSR)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
