"""The instance stack of one volume: stages (3) and (5) of the data flow.

The kernel adapter, tests and (later) filter-initiated I/O enter the stack the
same way: ``await stack.dispatch(cbd)``. The stack runs the pre-operation
callbacks of the attached instances from the highest altitude down, the backend
at the bottom, and the post-operation callbacks back up. It knows nothing of
FUSE. ``pending`` holds what a pended request needs: completion from any task
or thread, cancellation, and the cancel-safe queue; ``work_items`` moves a
filter's slow work off the request path.

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
from .instance_stack import (
    Backend,
    Filter,
    Instance,
    InstanceStack,
    RelatedObjects,
    StackError,
    VerifierError,
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
    "Filter",
    "Instance",
    "InstanceStack",
    "RelatedObjects",
    "SetContext",
    "StackError",
    "VerifierError",
    "allocate_context",
    "clear_cancel_completion",
    "complete_cancelled",
    "complete_pended_postoperation",
    "complete_pended_preoperation",
    "delete_context",
    "do_completion_processing_when_safe",
    "get_context",
    "get_contexts",
    "queue_deferred_io_work_item",
    "queue_generic_work_item",
    "reference_context",
    "release_context",
    "set_cancel_completion",
    "set_context",
]
