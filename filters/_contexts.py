"""Contexts the samples share: finding a context on an object, or making and setting one.

``find_or_create_context`` is the pattern every Windows context sample
repeats (get; else allocate, initialize, set with keep-if-exists, and release
the loser of a race); ctx, delete and change use it.
"""

from __future__ import annotations

from collections.abc import Callable

from fltfuse import (
    Context,
    ContextType,
    RelatedObjects,
    SetContext,
    allocate_context,
    get_context,
    release_context,
    set_context,
)


def find_or_create_context(
    objects: RelatedObjects, context_type: ContextType, initialize: Callable[[Context], None]
) -> Context:
    """The context of ``context_type`` set on the object ``objects`` names, made and set if there is none.

    A new context is passed to ``initialize`` before it is set. Setting uses
    KEEP_IF_EXISTS: if another one got set meanwhile, that one is returned and
    the new one released. The caller owns one reference to the result.
    """
    context = get_context(objects, context_type)
    if context is not None:
        return context
    context = allocate_context(objects, context_type)
    initialize(context)
    _, existing = set_context(objects, context, SetContext.KEEP_IF_EXISTS)
    if existing is not None:
        release_context(context)
        return existing
    return context
