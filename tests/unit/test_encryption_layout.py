"""The encryption filter's file format (filters/encryption/layout.py): sizes, records, and what fails their check.

Everything here is pure computation on bytes: no volume, no filter. Plaintexts come from seeded RNGs; only the
nonces and file ids are random (os.urandom), and no assertion depends on their values.
"""

from __future__ import annotations

import random

import pytest

from filters.encryption.layout import (
    BLOCK_SIZE,
    FILE_ID_SIZE,
    HEADER_SIZE,
    MAGIC,
    NONCE_SIZE,
    OVERHEAD,
    RECORD_SIZE,
    TAG_SIZE,
    FileCipher,
    NotEncrypted,
    TamperedBlock,
    cipher_size,
    new_header,
    parse_header,
    plain_size,
    record_offset,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
FILE_ID = bytes(range(100, 100 + FILE_ID_SIZE))


def plaintext(length: int, seed: int = 0) -> bytes:
    return random.Random(seed * 100_003 + length).randbytes(length)


def sealed(length: int, seed: int = 0) -> tuple[bytes, bytearray]:
    """A plaintext of ``length`` bytes and its records (block 0 onwards) under KEY and FILE_ID."""
    plain = plaintext(length, seed)
    return plain, FileCipher(KEY).seal(FILE_ID, 0, plain)


# -- sizes ----------------------------------------------------------------------------------------------


def test_the_constants_describe_the_documented_format() -> None:
    assert (len(MAGIC), HEADER_SIZE, BLOCK_SIZE, NONCE_SIZE, TAG_SIZE) == (8, 24, 16384, 12, 16)
    assert (OVERHEAD, RECORD_SIZE) == (28, 16412)
    assert [record_offset(i) for i in range(3)] == [24, 24 + 16412, 24 + 2 * 16412]


def test_plain_size_inverts_cipher_size_for_every_size_up_to_three_blocks_and_beyond() -> None:
    for n in range(3 * BLOCK_SIZE + 51):
        assert plain_size(cipher_size(n)) == n, n
    for n in (2**20 - 1, 2**20, 10 * 2**20 + 1, 2**31 + 5, 2**40 + 4095, 2**62 + 4096):
        assert plain_size(cipher_size(n)) == n, n


def test_cipher_size_is_header_plus_records_and_empty_stays_empty() -> None:
    assert cipher_size(0) == 0
    assert cipher_size(1) == HEADER_SIZE + 1 + OVERHEAD
    assert cipher_size(BLOCK_SIZE) == HEADER_SIZE + RECORD_SIZE
    assert cipher_size(BLOCK_SIZE + 1) == HEADER_SIZE + RECORD_SIZE + 1 + OVERHEAD
    assert cipher_size(5 * BLOCK_SIZE) == record_offset(5)


def test_a_cipher_size_that_cannot_occur_maps_to_the_plaintext_its_whole_records_hold() -> None:
    """For every ciphertext size c, plain_size(c) is the largest n with cipher_size(n) <= c: a header cut short,
    or a last record cut inside its overhead, adds no plaintext (so a torn file never shows more than it holds)."""
    top = record_offset(4) + OVERHEAD + 1  # into a fifth record, past its overhead
    n = 0  # the largest n with cipher_size(n) <= c, walked along with c (cipher_size is strictly increasing)
    impossible = 0
    for c in range(top):
        while cipher_size(n + 1) <= c:
            n += 1
        assert plain_size(c) == n, c
        impossible += cipher_size(n) != c
    # the sizes that cannot occur: 1..24 (a header alone) and the 28 sizes ending inside a record's overhead
    assert impossible == HEADER_SIZE + 5 * OVERHEAD
    assert [plain_size(c) for c in (1, HEADER_SIZE, HEADER_SIZE + OVERHEAD, HEADER_SIZE + OVERHEAD + 1)] == [0, 0, 0, 1]
    assert plain_size(record_offset(1) + OVERHEAD) == BLOCK_SIZE


# -- sealing and opening -----------------------------------------------------------------------------------


def test_seal_and_open_round_trip_for_every_length_across_block_boundaries() -> None:
    cipher = FileCipher(KEY)
    for length in range(1, 9001):
        plain = plaintext(length)
        records = cipher.seal(FILE_ID, 0, plain)
        assert len(records) == cipher_size(length) - HEADER_SIZE, length
        assert cipher.open(FILE_ID, 0, records) == plain, length


def test_a_run_of_records_opens_from_any_block_and_a_prefix_goes_first() -> None:
    cipher = FileCipher(KEY)
    plain = plaintext(5 * BLOCK_SIZE + 777, seed=1)
    header, file_id = new_header()
    whole = cipher.seal(file_id, 0, plain, header)
    assert whole[:HEADER_SIZE] == header and len(whole) == cipher_size(len(plain))
    for first in range(6):
        for last in range(first, 6):
            run = whole[record_offset(first) : record_offset(last + 1)]
            assert cipher.open(file_id, first, run) == plain[first * BLOCK_SIZE : (last + 1) * BLOCK_SIZE]
    # a run sealed from block 3 is what the whole file holds there, and only there
    tail = cipher.seal(file_id, 3, plain[3 * BLOCK_SIZE :])
    assert cipher.open(file_id, 3, tail) == plain[3 * BLOCK_SIZE :]
    with pytest.raises(TamperedBlock) as info:
        cipher.open(file_id, 0, tail)
    assert info.value.index == 0


def test_each_seal_takes_a_fresh_nonce() -> None:
    cipher = FileCipher(KEY)
    plain = plaintext(2 * BLOCK_SIZE)
    first, second = cipher.seal(FILE_ID, 0, plain), cipher.seal(FILE_ID, 0, plain)
    for index in range(2):
        at = index * RECORD_SIZE
        assert first[at : at + NONCE_SIZE] != second[at : at + NONCE_SIZE]
        assert first[at : at + RECORD_SIZE] != second[at : at + RECORD_SIZE]
    assert plain[:64] not in first


# -- what fails the check --------------------------------------------------------------------------------


def test_a_flipped_byte_anywhere_in_any_record_names_that_block() -> None:
    """Every byte of a file of two full records and a short one (nonce, ciphertext, tag), one at a time."""
    _, records = sealed(2 * BLOCK_SIZE + 100)
    cipher = FileCipher(KEY)
    rng = random.Random(6)
    for at in range(len(records)):
        damaged = bytearray(records)
        damaged[at] ^= 1 << rng.randrange(8)
        with pytest.raises(TamperedBlock, match=rf"^block {at // RECORD_SIZE} failed its authentication check"):
            cipher.open(FILE_ID, 0, damaged)


def test_a_record_moved_to_another_index_or_another_file_fails() -> None:
    cipher = FileCipher(KEY)
    _, records = sealed(3 * BLOCK_SIZE, seed=2)
    blocks = [records[i * RECORD_SIZE : (i + 1) * RECORD_SIZE] for i in range(3)]
    swapped = blocks[1] + blocks[0] + blocks[2]
    with pytest.raises(TamperedBlock) as info:
        cipher.open(FILE_ID, 0, swapped)
    assert info.value.index == 0
    replayed = blocks[0] + blocks[1] + blocks[1]  # block 1's record written again at block 2
    with pytest.raises(TamperedBlock) as info:
        cipher.open(FILE_ID, 0, replayed)
    assert info.value.index == 2
    # the same records opened as another file's (another file id), or under another key
    other_id = bytes(reversed(FILE_ID))
    for opener, file_id in ((cipher, other_id), (FileCipher(OTHER_KEY), FILE_ID)):
        with pytest.raises(TamperedBlock) as info:
            opener.open(file_id, 0, records)
        assert info.value.index == 0
    # another file's record (same key, same index) moved into this file
    foreign = FileCipher(KEY).seal(other_id, 1, plaintext(BLOCK_SIZE, seed=3))
    with pytest.raises(TamperedBlock) as info:
        cipher.open(FILE_ID, 0, blocks[0] + foreign + blocks[2])
    assert info.value.index == 1


def test_a_last_record_cut_short_fails_unless_it_is_all_zeros() -> None:
    cipher = FileCipher(KEY)
    plain, records = sealed(BLOCK_SIZE + 500, seed=4)
    for cut in (1, 5, OVERHEAD - 1, OVERHEAD, OVERHEAD + 1, OVERHEAD + 499):  # the last record keeps ``cut`` bytes
        with pytest.raises(TamperedBlock) as info:
            cipher.open(FILE_ID, 0, records[: RECORD_SIZE + cut])
        assert info.value.index == 1
    assert cipher.open(FILE_ID, 0, records[:RECORD_SIZE]) == plain[:BLOCK_SIZE]


def test_all_zero_slots_are_holes_and_open_as_zeros() -> None:
    cipher = FileCipher(KEY)
    plain = plaintext(3 * BLOCK_SIZE, seed=5)
    records = cipher.seal(FILE_ID, 0, plain)
    hole = bytes(RECORD_SIZE)
    middle_hole = records[:RECORD_SIZE] + hole + records[2 * RECORD_SIZE :]
    assert cipher.open(FILE_ID, 0, middle_hole) == plain[:BLOCK_SIZE] + bytes(BLOCK_SIZE) + plain[2 * BLOCK_SIZE :]
    assert cipher.open(FILE_ID, 0, hole * 3) == bytes(3 * BLOCK_SIZE)
    # a hole at the end of the file: a short zero slot holds its length less the overhead, none below that
    for rest in (1, 100, BLOCK_SIZE - 1):
        assert cipher.open(FILE_ID, 0, records[:RECORD_SIZE] + bytes(rest + OVERHEAD)) == plain[:BLOCK_SIZE] + bytes(
            rest
        )
    for short in (1, OVERHEAD - 1, OVERHEAD):
        assert cipher.open(FILE_ID, 0, records[:RECORD_SIZE] + bytes(short)) == plain[:BLOCK_SIZE]
    assert cipher.open(FILE_ID, 0, b"") == b""
    # a zero slot is a hole under any key and any file id; one non-zero byte makes it a damaged record
    assert FileCipher(OTHER_KEY).open(bytes(FILE_ID_SIZE), 7, hole) == bytes(BLOCK_SIZE)
    almost = bytearray(hole)
    almost[2000] = 1
    with pytest.raises(TamperedBlock) as info:
        cipher.open(FILE_ID, 4, almost)
    assert info.value.index == 4


# -- the header ------------------------------------------------------------------------------------------


def test_a_new_header_carries_a_new_file_id_that_parse_header_returns() -> None:
    header, file_id = new_header()
    assert len(header) == HEADER_SIZE and header.startswith(MAGIC) and len(file_id) == FILE_ID_SIZE
    assert parse_header(header) == file_id
    assert parse_header(header + b"records follow") == file_id
    assert parse_header(memoryview(header)) == file_id
    assert new_header()[1] != file_id


@pytest.mark.parametrize(
    "foreign",
    [
        b"",
        b"FLTENC",
        MAGIC,  # the magic, but the file id cut short
        MAGIC + bytes(FILE_ID_SIZE - 1),
        b"FLTENC\x00\x02" + bytes(FILE_ID_SIZE),  # another format version
        b"\x7fELF\x02\x01\x01\x00" + bytes(100),
        b"plain text that was here before the filter" * 3,
        bytes(HEADER_SIZE),  # a hole where the header should be
    ],
)
def test_parse_header_refuses_foreign_data(foreign: bytes) -> None:
    with pytest.raises(NotEncrypted, match="no encryption header"):
        parse_header(foreign)
