"""InstanceStack: the ordered instances of one volume above its backend."""

from __future__ import annotations

from typing import Protocol

from .._callback_data import CallbackData, MajorFunction


class Backend(Protocol):
    """The bottom of a stack: performs a request and sets its io_status and outputs."""

    async def dispatch(self, cbd: CallbackData) -> None: ...


class InstanceStack:
    """The instances attached to one volume, above the backend that ends every request.

    ``dispatch`` never raises for a failed request: the outcome is in
    ``cbd.io_status``. No instance is attached yet (the filter manager attaches
    them), so every request goes straight to the backend.
    """

    def __init__(self, backend: Backend):
        self.backend = backend

    async def dispatch(self, cbd: CallbackData) -> None:
        await self.backend.dispatch(cbd)

    def sees(self, major: MajorFunction) -> bool:
        """Whether any attached instance registered for ``major``.

        The kernel adapter lets the kernel cache what no instance needs to see
        (attributes, directory entries, file pages).
        """
        return False
