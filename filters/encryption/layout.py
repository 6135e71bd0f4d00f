"""The encrypted file format: a header, then one authenticated record per 16 KiB block of plaintext.

On the backing ext4 an encrypted regular file is::

    header   24 bytes   MAGIC (8) + file id (16 random bytes, made when the file gets its first byte)
    record 0 16412 bytes nonce (12) + AES-256-GCM ciphertext of plaintext bytes 0..16383 + tag (16)
    record 1 ...         the same for plaintext bytes 16384..32767
    ...
    last record         shorter when the plaintext ends inside its block: nonce + ciphertext + tag

Each record is sealed with a fresh random nonce each time it is written, and
its additional data is the file id and the block's index, so a record cannot
be moved to another place or another file without failing its check. An
empty file is empty on disk too (no header).

Why 16 KiB blocks: each AES-GCM call costs about 2.5 us whatever its size
(the cipher context is set up per call), so 4 KiB blocks made a 128 KiB
read cost 32 calls, and 1 MiB sequential I/O ran at 0.34-0.43x of the empty
stack; 8 KiB blocks reached 0.49-0.51x, 16 KiB 0.55-0.68x. The price is
random 4 KiB I/O, which moves a whole block (a write re-seals it): random
reads fell from 0.65x (4 KiB) to 0.28x. BENCHMARKS.md has the figures.

The plaintext size follows from the ciphertext size alone (``plain_size``):
no size is stored, so a crash between two writes never leaves a size that
disagrees with the records.

A record slot that is all zero bytes is a hole (ext4 reads zeros where
nothing was written): it reads as zeros. Every other record must pass its
check, or :class:`TamperedBlock` is raised.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"FLTENC\x00\x01"  # format version 1
FILE_ID_SIZE = 16
HEADER_SIZE = len(MAGIC) + FILE_ID_SIZE
BLOCK_SIZE = 16384
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
RECORD_SIZE = BLOCK_SIZE + OVERHEAD
_INDEX = struct.Struct(">Q")
_ZEROS = bytes(RECORD_SIZE)


class NotEncrypted(Exception):
    """The file's first bytes are not an encryption header: it was not written through this filter."""


class TamperedBlock(Exception):
    """A record failed its authentication check: changed on disk, or sealed with another key."""

    def __init__(self, index: int):
        super().__init__(f"block {index} failed its authentication check (changed on disk, or another key)")
        self.index = index


def cipher_size(plain: int) -> int:
    """The ciphertext size of a file whose plaintext is ``plain`` bytes long."""
    if plain == 0:
        return 0
    full, rest = divmod(plain, BLOCK_SIZE)
    return HEADER_SIZE + full * RECORD_SIZE + (rest + OVERHEAD if rest else 0)


def plain_size(cipher: int) -> int:
    """The plaintext size of a file whose ciphertext is ``cipher`` bytes long (what stat shows)."""
    if cipher <= HEADER_SIZE:
        return 0
    full, rest = divmod(cipher - HEADER_SIZE, RECORD_SIZE)
    return full * BLOCK_SIZE + max(0, rest - OVERHEAD)


def record_offset(index: int) -> int:
    """Where block ``index``'s record starts in the ciphertext."""
    return HEADER_SIZE + index * RECORD_SIZE


def new_header() -> tuple[bytes, bytes]:
    """A header for a file about to get its first byte, and its new file id."""
    file_id = os.urandom(FILE_ID_SIZE)
    return MAGIC + file_id, file_id


def parse_header(header: bytes) -> bytes:
    """The file id in ``header``; raises NotEncrypted if it is not one of ours."""
    if len(header) < HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
        raise NotEncrypted(f"no encryption header (first bytes {bytes(header[:8])!r})")
    return bytes(header[len(MAGIC) : HEADER_SIZE])


class FileCipher:
    """AES-256-GCM with one volume key: seals and opens runs of records."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(
        self, file_id: bytes, first: int, plaintext: bytes | bytearray | memoryview, prefix: bytes = b""
    ) -> bytearray:
        """``prefix`` followed by the records of ``plaintext`` (blocks ``first``, ``first + 1``, ...; the
        last may be short)."""
        view = memoryview(plaintext)
        count = -(-len(view) // BLOCK_SIZE)
        out = bytearray(len(prefix) + len(view) + count * OVERHEAD)
        out[: len(prefix)] = prefix
        dest = memoryview(out)
        nonces = os.urandom(NONCE_SIZE * count)  # one system call per request, not per block
        aad = bytearray(file_id + bytes(_INDEX.size))
        encrypt_into = self._aead.encrypt_into
        at = len(prefix)
        for i in range(count):
            chunk = view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            sealed = at + NONCE_SIZE + len(chunk) + TAG_SIZE
            dest[at : at + NONCE_SIZE] = nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            _INDEX.pack_into(aad, FILE_ID_SIZE, first + i)
            encrypt_into(dest[at : at + NONCE_SIZE], chunk, aad, dest[at + NONCE_SIZE : sealed])
            at = sealed
        return out

    def open(self, file_id: bytes, first: int, records: bytes | bytearray | memoryview) -> bytearray:
        """The plaintext of ``records`` (block ``first`` onwards; a short last record is the file's end).

        Raises TamperedBlock for a record that fails its check (a hole reads as zeros).
        """
        view = memoryview(records)
        full, rest = divmod(len(view), RECORD_SIZE)
        out = bytearray(full * BLOCK_SIZE + max(0, rest - OVERHEAD))
        dest = memoryview(out)
        aad = bytearray(file_id + bytes(_INDEX.size))
        decrypt_into = self._aead.decrypt_into
        for i in range(full + (rest > 0)):
            record = view[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]
            if len(record) <= OVERHEAD:  # a record cut inside its nonce or tag: only a hole's may be
                if record != _ZEROS[: len(record)]:
                    raise TamperedBlock(first + i)
                break
            plain = dest[i * BLOCK_SIZE : i * BLOCK_SIZE + len(record) - OVERHEAD]
            _INDEX.pack_into(aad, FILE_ID_SIZE, first + i)
            try:
                decrypt_into(record[:NONCE_SIZE], record[NONCE_SIZE:], aad, plain)
            except InvalidTag:
                if record != _ZEROS[: len(record)]:
                    raise TamperedBlock(first + i) from None
                plain[:] = _ZEROS[: len(plain)]  # a hole
        return out
