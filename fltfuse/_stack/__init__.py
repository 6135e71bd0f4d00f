"""The instance stack of one volume: stages (3) and (5) of the data flow.

The kernel adapter and tests enter the stack with ``await stack.dispatch(cbd)``,
filter-initiated I/O (``generated_io``) below its initiator with
``dispatch_generated``. The stack runs the pre-operation
callbacks of the attached instances from the highest altitude down, the backend
at the bottom, and the post-operation callbacks back up. It knows nothing of
FUSE. ``pending`` holds what a pended request needs: completion from any task
or thread, cancellation, and the cancel-safe queue; ``work_items`` moves a
filter's slow work off the request path; ``contexts`` keeps a filter's state
on volumes, instances, files and handles; ``names`` answers name queries.

Windows counterpart: the frame of FltMgr that holds the instances attached to
one volume.
"""

from __future__ import annotations

from .contexts import (
    Context,
    ContextError,
    ContextRegistration,
    ContextType,
    SetContext,
    allocate_context,
    delete_context,
    get_context,
    get_contexts,
    reference_context,
    release_context,
    set_context,
)
from .generated_io import (
    allocate_callback_data,
    cancel_file_open,
    close_file,
    create_file,
    flush_buffers,
    open_file_by_id,
    perform_io_asynchronously,
    perform_io_synchronously,
    query_information_file,
    read_file,
    set_information_file,
    write_file,
)
from .instance_stack import (
    Backend,
    Filter,
    Instance,
    InstanceStack,
    RelatedObjects,
    StackError,
    VerifierError,
)
from .names import (
    FileNameError,
    FileNameInformation,
    NameFormat,
    NameQuery,
    get_destination_file_name_information,
    get_file_name_information,
    get_file_name_information_unsafe,
    purge_name_cache,
)
from .pending import (
    CancelSafeQueue,
    clear_cancel_completion,
    complete_cancelled,
    complete_pended_postoperation,
    complete_pended_preoperation,
    set_cancel_completion,
)
from .work_items import do_completion_processing_when_safe, queue_deferred_io_work_item, queue_generic_work_item

__all__ = [
    "Backend",
    "CancelSafeQueue",
    "Context",
    "ContextError",
    "ContextRegistration",
    "ContextType",
    "FileNameError",
    "FileNameInformation",
    "Filter",
    "Instance",
    "InstanceStack",
    "NameFormat",
    "NameQuery",
    "RelatedObjects",
    "SetContext",
    "StackError",
    "VerifierError",
    "allocate_callback_data",
    "allocate_context",
    "cancel_file_open",
    "clear_cancel_completion",
    "close_file",
    "complete_cancelled",
    "complete_pended_postoperation",
    "complete_pended_preoperation",
    "create_file",
    "delete_context",
    "do_completion_processing_when_safe",
    "flush_buffers",
    "get_context",
    "get_contexts",
    "get_destination_file_name_information",
    "get_file_name_information",
    "get_file_name_information_unsafe",
    "open_file_by_id",
    "perform_io_asynchronously",
    "perform_io_synchronously",
    "purge_name_cache",
    "query_information_file",
    "queue_deferred_io_work_item",
    "queue_generic_work_item",
    "read_file",
    "reference_context",
    "release_context",
    "set_cancel_completion",
    "set_context",
    "set_information_file",
    "write_file",
]
