"""Finding and loading filters: INF file -> Python module -> registration -> instances.

Where it sits: between the command line and the instance stack. A filter is
found by name in the search path, its INF is parsed, the module its
``ServiceBinary`` names is imported and its ``REGISTRATION`` validated, and its
default instance is attached at the INF's altitude (unless the instance's
flags say no automatic attachment).

Windows counterpart: the service control manager starting a minifilter
service and ``FltRegisterFilter``/``FltStartFiltering`` with automatic
attachment.

The search path, in order:

1. directories given on the command line (``--filter-path DIR``);
2. directories in ``FLTFUSE_FILTER_PATH`` (separated by ``:``);
3. the project's own ``inf/``;
4. installed packages: an entry point in the group ``fltfuse.filters`` named
   after the filter points at its module, whose package holds ``<name>.inf``.

A ``ServiceBinary`` module is imported with the directory above the INF's
directory on the import path, so ``inf/x.inf`` can name ``filters.x``.

Every mount loads the filters whose INF in the search path has StartType 0
(boot), 1 (system) or 2 (auto): the default stack; ``--filter`` adds
demand-start ones (3). A disabled filter (4) never loads.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ._inf import FilterInf, InfError, StartType, parse_inf
from ._stack import Filter, Instance

log = logging.getLogger("fltfuse.loader")

_PROJECT_INF = Path(__file__).resolve().parent.parent / "inf"
ENTRY_POINT_GROUP = "fltfuse.filters"


class FilterNotFound(LookupError):
    """No INF for that filter name in the search path."""


class FilterDisabled(InfError):
    """The filter's INF has StartType 4: it never loads."""


def search_path(extra: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    dirs = [Path(d) for d in extra]
    dirs += [Path(d) for d in os.environ.get("FLTFUSE_FILTER_PATH", "").split(os.pathsep) if d]
    if _PROJECT_INF.is_dir():
        dirs.append(_PROJECT_INF)
    return dirs


def find_inf(name: str, extra: Sequence[str | os.PathLike[str]] = ()) -> FilterInf:
    """The INF of the filter called ``name`` (its service name, case-insensitive)."""
    wanted = name.lower()
    for directory in search_path(extra):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.inf")):
            if path.stem.lower() == wanted:
                inf = parse_inf(path)
                if inf.name.lower() != wanted:
                    raise InfError(path, 0, f"is named {path.name} but declares the filter {inf.name!r}")
                return inf
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name.lower() == wanted:
            package = entry.value.split(":")[0]
            resource = importlib.resources.files(package.rpartition(".")[0] or package) / f"{entry.name}.inf"
            with importlib.resources.as_file(resource) as path:
                return parse_inf(path)
    raise FilterNotFound(
        f"no INF for filter {name!r} in {', '.join(map(str, search_path(extra))) or 'the search path'}"
    )


@dataclass
class LoadedFilter:
    """A filter whose module is imported and registration validated, with the INF it came from."""

    filter: Filter
    inf: FilterInf


def load_filter(inf: FilterInf, overrides: Mapping[str, str] | None = None) -> LoadedFilter:
    """Import the filter's module and validate its ``REGISTRATION``; ``overrides`` are ``--param`` values."""
    if overrides:
        inf = inf.with_parameters(overrides)
    root = str(inf.path.resolve().parent.parent)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        module = importlib.import_module(inf.module)
    except ImportError as exc:
        raise InfError(inf.path, 0, f"ServiceBinary {inf.module!r} cannot be imported: {exc}") from exc
    finally:
        if added:
            sys.path.remove(root)
    registration = getattr(module, "REGISTRATION", None)
    if registration is None:
        raise InfError(inf.path, 0, f"module {inf.module} has no REGISTRATION")
    return LoadedFilter(Filter(inf.name, registration, parameters=inf.parameters), inf)


def default_instance(filter_: Filter, inf: FilterInf, altitude: Decimal | None = None) -> Instance | None:
    """The instance a filter attaches automatically, or None if its flags forbid it."""
    spec = inf.instance(None)
    if spec.no_automatic_attach:
        log.info("filter %s: instance %s does not attach automatically (flags 0x1)", inf.name, spec.name)
        return None
    return Instance(filter_, spec.name, altitude if altitude is not None else spec.altitude)


def default_filters(extra: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """The filters every mount loads: INFs in the search path with StartType boot, system or auto."""
    names: list[str] = []
    for directory in search_path(extra):
        for path in sorted(directory.glob("*.inf")) if directory.is_dir() else ():
            inf = parse_inf(path)
            if inf.start_type <= StartType.AUTO and inf.name.lower() not in (n.lower() for n in names):
                names.append(inf.name)
    return names


def load_all(
    names: Sequence[str], extra: Sequence[str | os.PathLike[str]] = (), parameters: Mapping[str, Mapping[str, str]] = {}
) -> list[LoadedFilter]:
    """Load the default filters and each named one (what a mount starts with)."""
    wanted = default_filters(extra)
    wanted += [n for n in names if n.lower() not in (w.lower() for w in wanted)]
    return [load_named(name, extra, parameters) for name in wanted]


def load_named(
    name: str, extra: Sequence[str | os.PathLike[str]] = (), parameters: Mapping[str, Mapping[str, str]] = {}
) -> LoadedFilter:
    """Find the filter called ``name``, refuse it if disabled, load it with its ``--param`` overrides."""
    inf = find_inf(name, extra)
    if inf.start_type == StartType.DISABLED:
        raise FilterDisabled(inf.path, 0, f"filter {inf.name} is disabled (StartType 4) and cannot be loaded")
    return load_filter(inf, parameters.get(inf.name.lower(), {}))


def load(
    names: Sequence[str], extra: Sequence[str | os.PathLike[str]] = (), parameters: Mapping[str, Mapping[str, str]] = {}
) -> list[Instance]:
    """Load the default filters and each named one; return the instances they attach automatically."""
    instances = (default_instance(lf.filter, lf.inf) for lf in load_all(names, extra, parameters))
    return [i for i in instances if i is not None]
