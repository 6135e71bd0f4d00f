"""The one NTSTATUS <-> errno table."""

import errno

import pytest

from fltfuse import NtStatus, errno_from_status, status_from_errno


@pytest.mark.parametrize("code", sorted(errno.errorcode))
def test_every_errno_round_trips(code: int) -> None:
    status = status_from_errno(code)
    assert not status.is_success or code == 0
    assert errno_from_status(status) == code


def test_named_statuses() -> None:
    assert status_from_errno(errno.ENOENT) is NtStatus.OBJECT_NAME_NOT_FOUND
    assert status_from_errno(errno.EACCES) is NtStatus.ACCESS_DENIED
    assert status_from_errno(errno.EEXIST) is NtStatus.OBJECT_NAME_COLLISION
    assert status_from_errno(errno.ENOTEMPTY) is NtStatus.DIRECTORY_NOT_EMPTY
    assert status_from_errno(errno.ENODATA) is NtStatus.NONEXISTENT_EA_ENTRY


def test_errno_without_a_windows_name_gets_a_customer_status() -> None:
    status = status_from_errno(errno.EPIPE)
    assert status.name == "ERRNO_EPIPE"
    assert status & 0x20000000  # the NTSTATUS customer bit
    assert NtStatus(int(status)) is status or NtStatus(int(status)) == status


def test_unmapped_failure_is_eio_and_success_is_zero() -> None:
    assert errno_from_status(NtStatus.UNSUCCESSFUL) == errno.EIO
    assert errno_from_status(NtStatus.SUCCESS) == 0
    assert errno_from_status(NtStatus.PENDING) == 0
