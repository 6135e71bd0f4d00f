"""namestest_recorder: logs the names it is given for opens, renames and unlinks (for test_names_mounted.py).

For each request below it logs one line ``namestest {json}`` in the daemon's log, with the
requestor's pid so that a test can pick out the requests of one command:

* post-CREATE (an open, or a new object): ``op`` "CREATE", ``normalized`` and ``opened``;
* pre-SET_INFORMATION of a rename: ``op`` "RENAME", ``normalized`` (the source) and ``destination``;
* pre-SET_INFORMATION of an unlink or rmdir: ``op`` "UNLINK" or "RMDIR", ``normalized``.

Each name is asked for with the default query method (the name cache, else the file system). A
query that fails logs the status's name instead of a name. It asks nothing at LINK, so that the
first normalized name of a hard-linked file is computed when it is next opened.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fltfuse import (
    CallbackData,
    DispositionParameters,
    FileNameError,
    FilterRegistration,
    MajorFunction,
    NameFormat,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    get_destination_file_name_information,
    get_file_name_information,
)

log = logging.getLogger("namestest.recorder")


def _name(ask: Any, *args: Any) -> str:
    try:
        return str(ask(*args).name)
    except FileNameError as exc:
        return exc.status.name


def _record(cbd: CallbackData, op: str, **names: str) -> None:
    log.info("namestest %s", json.dumps({"op": op, "pid": cbd.requestor.pid, **names}))


def post_create(cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    if not flags & PostopFlags.DRAINING and cbd.io_status.status == NtStatus.SUCCESS:
        _record(
            cbd,
            "CREATE",
            normalized=_name(get_file_name_information, cbd, objects, NameFormat.NORMALIZED),
            opened=_name(get_file_name_information, cbd, objects, NameFormat.OPENED),
        )
    return PostopCallbackStatus.FINISHED_PROCESSING


def pre_set_information(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    params = cbd.iopb.parameters
    if isinstance(params, RenameParameters):
        normalized = _name(get_file_name_information, cbd, objects, NameFormat.NORMALIZED)
        destination = _name(get_destination_file_name_information, cbd, objects)
        _record(cbd, "RENAME", normalized=normalized, destination=destination)
    elif isinstance(params, DispositionParameters):
        normalized = _name(get_file_name_information, cbd, objects, NameFormat.NORMALIZED)
        _record(cbd, "RMDIR" if params.directory else "UNLINK", normalized=normalized)
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: Any) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=(
        OperationRegistration(MajorFunction.CREATE, None, post_create),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_set_information),
    ),
)
