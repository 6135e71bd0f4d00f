"""The passthrough sample counts one pre and one post per request of each major function it sees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fltfuse import MajorFunction


def counts(module: Any) -> dict[MajorFunction, tuple[int, int]]:
    return {m: (module.PRE_CALLS[m], module.POST_CALLS[m]) for m in MajorFunction}


@pytest.mark.trio
async def test_every_request_passes_one_pre_and_one_post_per_instance(fltfuse_in_process: Callable[..., Any]) -> None:
    vol = fltfuse_in_process(filters=["passthrough"])
    import filters.passthrough as sample  # the module the loader imported

    before = counts(sample)
    await vol.write_file("a.txt", b"hello")
    assert await vol.read_file("a.txt") == b"hello"
    after = counts(sample)
    ran = {m: (after[m][0] - before[m][0], after[m][1] - before[m][1]) for m in MajorFunction}
    ran = {m: n for m, n in ran.items() if n != (0, 0)}
    assert all(pre == post for pre, post in ran.values()), ran  # every pre asked for its post, and got it
    for major in (MajorFunction.LOOKUP, MajorFunction.CREATE, MajorFunction.WRITE, MajorFunction.READ):
        assert ran.get(major, (0, 0))[0] >= 1, (major, ran)
    assert ran[MajorFunction.CLOSE][0] == 2  # the file was opened twice: one release each
