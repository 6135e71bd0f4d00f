"""INF files: what a filter is, where its instances sit, and its private parameters.

Where it sits: the filter manager reads a filter's INF when it *loads* the
filter (``fltmc load``, or at mount time for filters that start by
themselves), before the filter's module is imported and before any instance
attaches to a volume. Everything the stack later needs to place an instance
comes from here: the load order group, the instances with their altitudes and
flags, the default instance, and the parameters the filter reads back.

Windows counterpart: the minifilter's INF file, as processed by SetupAPI
(``[DefaultInstall.Services]`` -> ``AddService`` -> the service install
section -> ``AddReg`` sections), and the registry keys it leaves under
``HKLM\\SYSTEM\\CurrentControlSet\\Services\\<name>`` (``Instances``,
``Parameters``) that FltMgr reads when ``FltRegisterFilter`` runs.

The syntax is Windows' INF syntax, so a Windows filter developer recognises
it; the differences are deliberate and few: ``ServiceBinary`` names the Python
module that implements the filter, and only ``HKR`` registry lines are
accepted. Every error is an :class:`InfError` that names the file and the line.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import enum
import keyword
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

__all__ = [
    "KNOWN_CLASSES",
    "LOAD_ORDER_GROUPS",
    "SYSTEM_ALTITUDE_LIMIT",
    "FilterInf",
    "InfError",
    "InstanceSpec",
    "ParameterValue",
    "StartType",
    "altitude_in_group",
    "parse_inf",
]

log = logging.getLogger("fltfuse.inf")

ParameterValue = str | int | tuple[str, ...]
"""A private parameter: REG_SZ / REG_EXPAND_SZ -> str, REG_DWORD -> int, REG_MULTI_SZ -> tuple of str."""

SYSTEM_ALTITUDE_LIMIT = Decimal(20000)
"""Altitudes below this belong to FltMgr's own infrastructure filters."""


class InfError(Exception):
    """An INF file that cannot be loaded. ``str(e)`` is ``"path:line: message"``; line 0 means the whole file."""

    def __init__(self, path: str | os.PathLike[str], line: int, message: str) -> None:
        super().__init__(path, line, message)
        self.path = Path(path)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class StartType(enum.IntEnum):
    """The service's ``StartType``: when the filter is loaded (never where it sits: that is the altitude)."""

    BOOT = 0
    SYSTEM = 1
    AUTO = 2
    DEMAND = 3
    DISABLED = 4


def _group(low: int, high: int) -> tuple[Decimal, Decimal]:
    return Decimal(low), Decimal(high)


LOAD_ORDER_GROUPS: Mapping[str, tuple[Decimal, Decimal]] = MappingProxyType(
    {
        # Highest first, as in Microsoft's table; both ends inclusive.
        "Filter": _group(420000, 429999),  # legacy filters, top
        "FSFilter Top": _group(400000, 409999),
        "FSFilter Security Monitor": _group(392000, 394999),
        "FSFilter Activity Monitor": _group(360000, 389999),
        "FSFilter Undelete": _group(340000, 349999),
        "FSFilter Anti-Virus": _group(320000, 329999),
        "FSFilter Replication": _group(300000, 309999),
        "FSFilter Continuous Backup": _group(280000, 289999),
        "FSFilter Security Content Screener": _group(272000, 274999),
        "FSFilter Content Screener": _group(260000, 269999),
        "FSFilter Quota Management": _group(240000, 249999),
        "FSFilter System Recovery": _group(220000, 229999),
        "FSFilter Cluster File System": _group(200000, 209999),
        "FSFilter HSM": _group(180000, 189999),
        "FSFilter Imaging": _group(170000, 175000),
        "FSFilter Compression": _group(160000, 169999),
        "FSFilter Encryption": _group(140000, 149999),
        "FSFilter Virtualization": _group(130000, 139999),
        "FSFilter Physical Quota Management": _group(120000, 129999),
        "FSFilter Open File": _group(100000, 109999),
        "FSFilter Security Enhancer": _group(80000, 89999),
        "FSFilter Copy Protection": _group(60000, 69999),
        "FSFilter Security Bottom": _group(52000, 54999),
        "FSFilter Bottom": _group(40000, 49999),
        "FSFilter System": _group(20000, 29999),  # reserved
        "FSFilter Infrastructure": _group(0, 19999),  # reserved: FltMgr itself
    }
)
"""Load order group -> (lowest, highest) altitude, inclusive (a fraction belongs to its integer)."""

_GROUPS_BY_FOLDED = {name.casefold(): name for name in LOAD_ORDER_GROUPS}

KNOWN_CLASSES: tuple[str, ...] = (
    "ActivityMonitor",
    "AntiVirus",
    "Bottom",
    "CFSMetadataServer",
    "Compression",
    "ContinuousBackup",
    "ContentScreener",
    "CopyProtection",
    "Encryption",
    "HSM",
    "Infrastructure",
    "OpenFileBackup",
    "PhysicalQuotaManagement",
    "QuotaManagement",
    "Replication",
    "SecurityEnhancer",
    "SystemRecovery",
    "Top",
    "Undelete",
    "Virtualization",
)
"""The file system filter classes of ``[Version] Class``; any other class is a warning."""

_KNOWN_CLASSES_FOLDED = frozenset(c.casefold() for c in KNOWN_CLASSES)


def _canonical_group(group: str) -> str:
    try:
        return _GROUPS_BY_FOLDED[group.casefold()]
    except KeyError:
        raise KeyError(f"unknown load order group {group!r}") from None


def altitude_in_group(group: str, altitude: Decimal) -> bool:
    """Whether ``altitude`` lies in ``group``'s range (group names are case-insensitive; KeyError if unknown).

    Microsoft allocates integer altitudes and a vendor may add a fraction
    inside its own integer, so "389999.5" belongs to 389999 and is inside
    "FSFilter Activity Monitor" (360000-389999).
    """
    low, high = LOAD_ORDER_GROUPS[_canonical_group(group)]
    if not altitude.is_finite():
        return False
    return low <= altitude.to_integral_value(rounding=ROUND_FLOOR) <= high


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class InstanceSpec:
    """One ``Instances\\<name>`` key: where an instance of the filter sits and how it may attach."""

    name: str
    altitude: Decimal
    altitude_text: str
    flags: int

    NO_AUTOMATIC_ATTACH = 0x1
    NO_MANUAL_ATTACH = 0x2

    @property
    def no_automatic_attach(self) -> bool:
        """Flags bit 0x1: not attached at filter load or on a new mount, only by an explicit attach."""
        return bool(self.flags & self.NO_AUTOMATIC_ATTACH)

    @property
    def no_manual_attach(self) -> bool:
        """Flags bit 0x2: an explicit attach (``fltmc attach``) of this instance is refused."""
        return bool(self.flags & self.NO_MANUAL_ATTACH)


class _ParameterMap(Mapping[str, ParameterValue]):
    """A read-only mapping with case-insensitive names, like a registry key's values."""

    __slots__ = ("_index", "_items")

    def __init__(self, items: Mapping[str, ParameterValue] | Iterable[tuple[str, ParameterValue]] = ()) -> None:
        self._items: dict[str, ParameterValue] = dict(items)
        self._index = {name.casefold(): name for name in self._items}

    def __getitem__(self, name: str) -> ParameterValue:
        if isinstance(name, str):
            original = self._index.get(name.casefold())
            if original is not None:
                return self._items[original]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset((name.casefold(), value) for name, value in self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class FilterInf:
    """What a filter's INF says, checked. Built by :func:`parse_inf`."""

    path: Path
    name: str
    display_name: str
    description: str
    class_name: str
    class_guid: str
    provider: str
    driver_ver: str
    module: str
    start_type: StartType
    load_order_group: str
    dependencies: tuple[str, ...]
    instances: tuple[InstanceSpec, ...]
    default_instance: str
    parameters: Mapping[str, ParameterValue]
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.parameters, _ParameterMap):
            object.__setattr__(self, "parameters", _ParameterMap(self.parameters))
        object.__setattr__(self, "instances", tuple(self.instances))
        object.__setattr__(self, "dependencies", tuple(self.dependencies))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def instance(self, name: str | None = None) -> InstanceSpec:
        """The instance called ``name`` (case-insensitive), or the default instance for ``None``."""
        wanted = self.default_instance if name is None else name
        for spec in self.instances:
            if spec.name.casefold() == wanted.casefold():
                return spec
        known = ", ".join(repr(spec.name) for spec in self.instances)
        raise KeyError(f"filter {self.name!r} has no instance {wanted!r} (its instances: {known})")

    def with_parameters(self, overrides: Mapping[str, str]) -> FilterInf:
        """A copy with parameters overridden (``--param NAME.KEY=VALUE``; ``overrides`` maps KEY -> VALUE).

        An existing parameter keeps its type: a REG_DWORD one must get a
        number (decimal or 0x hex), a REG_MULTI_SZ one is split on commas.
        A new name is added as a string. Names are case-insensitive.
        """
        items = dict(self.parameters.items())
        index = {name.casefold(): name for name in items}
        for key, text in overrides.items():
            if not key:
                raise ValueError(f"filter {self.name!r}: a parameter override needs a name")
            existing = index.get(key.casefold())
            if existing is None:
                items[key] = text
                index[key.casefold()] = key
                continue
            old = items[existing]
            new: ParameterValue
            if isinstance(old, int):
                number = _parse_number(text)
                if number is None or number > _DWORD_MAX:
                    raise ValueError(
                        f"parameter {existing!r} of filter {self.name!r} is a REG_DWORD: "
                        f"{text!r} is not a number from 0 to 0xFFFFFFFF (decimal or 0x hex)"
                    )
                new = number
            elif isinstance(old, tuple):
                new = tuple(part.strip() for part in text.split(",") if part.strip())
            else:
                new = text
            items[existing] = new
        return dataclasses.replace(self, parameters=_ParameterMap(items))


# --------------------------------------------------------------------------- lexical helpers

_DWORD_MAX = 0xFFFFFFFF
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_ALTITUDE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_TOKEN = re.compile(r'%([^%",;\s]+)%')
_GUID = re.compile(r"\{[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\}")
_DATE = re.compile(r"([0-9]{1,2})/([0-9]{1,2})/([0-9]{4})")
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+){0,3}")
_SIGNATURE = "$WINDOWS NT$"


def _parse_number(text: str) -> int | None:
    """An INF number: decimal or 0x hex, non-negative."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)


def _is_module_name(text: str) -> bool:
    parts = text.split(".")
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in parts)


class _Line(NamedTuple):
    number: int  # first physical line of a continued line
    text: str


@dataclass
class _Section:
    name: str  # as first written
    line: int  # its (first) header
    lines: list[_Line]


class _Entry(NamedTuple):
    line: int
    key: str
    fields: list[str]


_REG_SZ = 0x00000000
_REG_MULTI_SZ = 0x00010000
_REG_DWORD = 0x00010001
_REG_EXPAND_SZ = 0x00020000
_REG_TYPES = {
    _REG_SZ: "REG_SZ",
    _REG_MULTI_SZ: "REG_MULTI_SZ",
    _REG_DWORD: "REG_DWORD",
    _REG_EXPAND_SZ: "REG_EXPAND_SZ",
}


class _Service(NamedTuple):
    display_name: str
    description: str
    module: str
    start_type: StartType
    group: str
    dependencies: tuple[str, ...]
    registry: list[_Section]  # the AddReg sections, in order


class _RegValue(NamedTuple):
    line: int
    key_path: str  # casefolded registry path under HKR, e.g. "parameters\\instances\\top"
    kind: int
    value: ParameterValue


@dataclass
class _InstanceRecord:
    name: str  # as first written
    line: int  # its first registry line
    values: dict[str, _RegValue]


# --------------------------------------------------------------------------- the parser


def parse_inf(path: str | os.PathLike[str], *, allow_system_altitudes: bool = False) -> FilterInf:
    """Read and check a filter's INF file.

    Raises :class:`InfError` (``"path:line: message"``) for anything that
    would stop the filter from loading; the rest (an unknown Class, an
    altitude outside its load order group, ignored registry values) comes back
    in ``FilterInf.warnings`` and is logged at WARNING. Altitudes below 20000
    are refused unless ``allow_system_altitudes``.
    """
    return _Parser(Path(path), allow_system_altitudes).parse()


class _Parser:
    def __init__(self, path: Path, allow_system_altitudes: bool) -> None:
        self.path = path
        self.allow_system_altitudes = allow_system_altitudes
        self.sections: dict[str, _Section] = {}
        self.strings: dict[str, str] = {}
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ reporting

    def error(self, line: int, message: str) -> InfError:
        return InfError(self.path, line, message)

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(f"{self.path}:{line}: {message}")

    # ------------------------------------------------------------------ text -> sections

    def read_text(self) -> str:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise self.error(0, f"cannot read the INF file: {exc.strerror or exc}") from exc
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            encoding = "utf-16"  # what Microsoft's samples are saved as
        elif raw.startswith(codecs.BOM_UTF8):
            encoding = "utf-8-sig"
        else:
            encoding = "utf-8"
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].decode(encoding, errors="replace").count("\n") + 1
            raise self.error(line, f"not valid {encoding.upper()} text") from exc

    def strip_comment(self, raw: str, number: int) -> str:
        in_quotes = False
        for i, char in enumerate(raw):
            if char == '"':
                in_quotes = not in_quotes
            elif char == ";" and not in_quotes:
                return raw[:i]
        if in_quotes:
            raise self.error(number, 'unterminated quoted string (a " without its closing ")')
        return raw

    def logical_lines(self, text: str) -> Iterator[_Line]:
        pending: list[str] = []
        start = 0
        for number, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
            body = self.strip_comment(raw, number).rstrip()
            if not pending:
                start = number
            if body.endswith("\\"):  # a trailing backslash continues the line
                pending.append(body[:-1])
                continue
            pending.append(body)
            joined = "".join(pending).strip()
            pending = []
            if joined:
                yield _Line(start, joined)
        joined = "".join(pending).strip()
        if joined:
            yield _Line(start, joined)

    def split_sections(self, text: str) -> None:
        current: _Section | None = None
        for line in self.logical_lines(text):
            if line.text.startswith("["):
                if not line.text.endswith("]"):
                    raise self.error(line.number, f"malformed section header {line.text!r} (expected [Name])")
                name = line.text[1:-1].strip()
                if not name:
                    raise self.error(line.number, "empty section name []")
                folded = name.casefold()
                # A section that appears twice is one section (as in Windows): its lines are merged.
                current = self.sections.get(folded)
                if current is None:
                    current = self.sections[folded] = _Section(name, line.number, [])
                continue
            if current is None:
                raise self.error(line.number, f"{line.text!r} is outside any section (the file must start with one)")
            current.lines.append(line)

    # ------------------------------------------------------------------ fields and strings

    def fields(self, text: str, line: int, *, split: bool = True, substitute: bool = True) -> list[str]:
        """Split ``text`` into comma-separated fields: quotes, ``""``, ``%token%`` and ``%%`` resolved.

        A field is any mix of quoted and unquoted pieces (``"Instances\\"%Name%``);
        whitespace around the unquoted pieces is dropped, text in quotes and
        substituted string values are kept exactly.
        """
        fields: list[str] = []
        pieces: list[tuple[str, bool]] = []  # (text, protected from stripping)
        in_quotes = False
        i = 0
        while i < len(text):
            char = text[i]
            if char == '"':
                if in_quotes and text.startswith('""', i):
                    pieces.append(('"', True))
                    i += 2
                    continue
                in_quotes = not in_quotes
                pieces.append(("", True))
                i += 1
            elif char == "%" and substitute:
                if text.startswith("%%", i):
                    pieces.append(("%", True))
                    i += 2
                    continue
                match = _TOKEN.match(text, i)
                if match is None:
                    raise self.error(line, "a '%' that starts no %token% (write %% for a literal percent sign)")
                value = self.strings.get(match.group(1).casefold())
                if value is None:
                    raise self.error(line, f"undefined string token %{match.group(1)}% (not in [Strings])")
                pieces.append((value, True))
                i = match.end()
            elif char == "," and split and not in_quotes:
                fields.append(_join(pieces))
                pieces = []
                i += 1
            else:
                pieces.append((char, in_quotes))
                i += 1
        if in_quotes:
            raise self.error(line, 'unterminated quoted string (a " without its closing ")')
        fields.append(_join(pieces))
        return fields

    @staticmethod
    def split_key(text: str) -> tuple[str, str] | None:
        in_quotes = False
        for i, char in enumerate(text):
            if char == '"':
                in_quotes = not in_quotes
            elif char == "=" and not in_quotes:
                return text[:i], text[i + 1 :]
        return None

    def read_strings(self) -> None:
        section = self.sections.get("strings")
        if section is None:
            return
        first_line: dict[str, int] = {}
        for line in section.lines:
            pair = self.split_key(line.text)
            if pair is None:
                raise self.error(line.number, f"expected 'token = \"value\"' in [{section.name}], got {line.text!r}")
            token = self.fields(pair[0], line.number, split=False, substitute=False)[0]
            if not token:
                raise self.error(line.number, "a string token needs a name")
            folded = token.casefold()
            if folded in first_line:
                raise self.error(
                    line.number, f"string token {token!r} defined twice (first at line {first_line[folded]})"
                )
            first_line[folded] = line.number
            self.strings[folded] = self.fields(pair[1], line.number, split=False, substitute=False)[0]

    def check_tokens(self) -> None:
        """Every %token% in the file must resolve, also in sections fltfuse does not read."""
        for folded, section in self.sections.items():
            if folded == "strings" or folded.startswith("strings."):
                continue
            for line in section.lines:
                self.fields(line.text, line.number)

    # ------------------------------------------------------------------ key = value sections

    def entries(self, section: _Section) -> dict[str, list[_Entry]]:
        result: dict[str, list[_Entry]] = {}
        for line in section.lines:
            pair = self.split_key(line.text)
            if pair is None:
                raise self.error(line.number, f"expected 'key = value' in [{section.name}], got {line.text!r}")
            key = self.fields(pair[0], line.number, split=False)[0]
            result.setdefault(key.casefold(), []).append(_Entry(line.number, key, self.fields(pair[1], line.number)))
        return result

    def one(self, entries: dict[str, list[_Entry]], section: _Section, key: str) -> _Entry | None:
        """The one ``key = ...`` line of ``section``, or None; a key given twice is an error."""
        found = entries.get(key.casefold())
        if not found:
            return None
        if len(found) > 1:
            raise self.error(found[1].line, f"{key} given twice in [{section.name}] (first at line {found[0].line})")
        return found[0]

    def required(self, entries: dict[str, list[_Entry]], section: _Section, key: str) -> _Entry:
        """Like :meth:`one`; a missing key is an error on the section's header line."""
        entry = self.one(entries, section, key)
        if entry is None:
            raise self.error(section.line, f"[{section.name}] has no {key}")
        return entry

    def single(self, entry: _Entry) -> str:
        if len(entry.fields) != 1:
            raise self.error(
                entry.line, f"{entry.key} takes one value, got {len(entry.fields)} (quote a value that has a comma)"
            )
        return entry.fields[0]

    def number(self, entry: _Entry) -> int:
        value = self.single(entry)
        number = _parse_number(value)
        if number is None:
            raise self.error(entry.line, f"{entry.key} must be a number, not {value!r}")
        return number

    def optional_text(self, entries: dict[str, list[_Entry]], section: _Section, key: str, default: str) -> str:
        entry = self.one(entries, section, key)
        return default if entry is None else self.single(entry)

    # ------------------------------------------------------------------ the whole file

    def parse(self) -> FilterInf:
        self.split_sections(self.read_text())
        self.read_strings()
        self.check_tokens()
        version = self.read_version()
        service_name, service_section = self.read_install()
        service = self.read_service(service_name, service_section)
        instances, default_instance, parameters = self.read_registry(service.group, service.registry)
        for warning in self.warnings:
            log.warning("%s", warning)
        return FilterInf(
            path=self.path,
            name=service_name,
            display_name=service.display_name,
            description=service.description,
            class_name=version["class"],
            class_guid=version["guid"],
            provider=version["provider"],
            driver_ver=version["driver_ver"],
            module=service.module,
            start_type=service.start_type,
            load_order_group=service.group,
            dependencies=service.dependencies,
            instances=instances,
            default_instance=default_instance,
            parameters=parameters,
            warnings=tuple(self.warnings),
        )

    def read_version(self) -> dict[str, str]:
        section = self.sections.get("version")
        if section is None:
            raise self.error(0, "no [Version] section")
        entries = self.entries(section)
        signature = self.required(entries, section, "Signature")
        value = self.single(signature)
        if value.casefold() != _SIGNATURE.casefold():
            raise self.error(signature.line, f'Signature must be "{_SIGNATURE}", not {value!r}')
        class_entry = self.required(entries, section, "Class")
        class_name = self.single(class_entry)
        if class_name.casefold() not in _KNOWN_CLASSES_FOLDED:
            self.warn(
                class_entry.line,
                f"unknown Class {class_name!r}; the file system filter classes are {', '.join(KNOWN_CLASSES)}",
            )
        guid = self.optional_text(entries, section, "ClassGuid", "")
        if guid and not _GUID.fullmatch(guid):
            line = entries["classguid"][0].line
            raise self.error(line, f"ClassGuid {guid!r} is not a GUID like {{b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}}")
        return {
            "class": class_name,
            "guid": guid,
            "provider": self.optional_text(entries, section, "Provider", ""),
            "driver_ver": self.read_driver_ver(entries, section),
        }

    def read_driver_ver(self, entries: dict[str, list[_Entry]], section: _Section) -> str:
        entry = self.one(entries, section, "DriverVer")
        if entry is None:
            return ""
        if not 1 <= len(entry.fields) <= 2:
            raise self.error(entry.line, "DriverVer is MM/DD/YYYY[,w.x.y.z]")
        date = _DATE.fullmatch(entry.fields[0])
        valid = date is not None
        if date is not None:
            try:
                datetime.date(int(date.group(3)), int(date.group(1)), int(date.group(2)))
            except ValueError:
                valid = False
        if not valid:
            raise self.error(entry.line, f"DriverVer date {entry.fields[0]!r} is not a date MM/DD/YYYY")
        if len(entry.fields) == 2 and not _VERSION.fullmatch(entry.fields[1]):
            raise self.error(entry.line, f"DriverVer version {entry.fields[1]!r} is not w.x.y.z")
        return ",".join(entry.fields)

    def read_install(self) -> tuple[str, _Section]:
        """``[DefaultInstall.NTamd64.Services]`` (preferred) or ``[DefaultInstall.Services]``: its one AddService."""
        for name in ("defaultinstall.ntamd64.services", "defaultinstall.services"):
            section = self.sections.get(name)
            if section is not None:
                break
        else:
            raise self.error(0, "no [DefaultInstall.Services] (or [DefaultInstall.NTamd64.Services]) section")
        entries = self.entries(section)
        found = entries.get("addservice", [])
        if not found:
            raise self.error(section.line, f"[{section.name}] has no AddService")
        if len(found) > 1:
            raise self.error(found[1].line, f"a filter INF installs one service: second AddService in [{section.name}]")
        entry = found[0]
        if len(entry.fields) < 3 or not entry.fields[0] or not entry.fields[2]:
            raise self.error(entry.line, "AddService is ServiceName,flags,ServiceInstallSection")
        service_name, flags, section_name = entry.fields[:3]
        if "\\" in service_name or "/" in service_name:
            raise self.error(entry.line, f"service name {service_name!r} must not contain a slash or backslash")
        if flags and _parse_number(flags) is None:
            raise self.error(entry.line, f"AddService flags {flags!r} is not a number")
        service_section = self.sections.get(section_name.casefold())
        if service_section is None:
            raise self.error(entry.line, f"AddService names the section [{section_name}], which is not in the file")
        return service_name, service_section

    def read_service(self, service_name: str, section: _Section) -> _Service:
        entries = self.entries(section)
        binary = self.required(entries, section, "ServiceBinary")
        module = self.single(binary)
        if not _is_module_name(module):
            raise self.error(
                binary.line,
                f"ServiceBinary must name the Python module that implements the filter "
                f"(a dotted name such as filters.nullfilter), not {module!r}",
            )
        service_type = self.required(entries, section, "ServiceType")
        if self.number(service_type) != 2:
            raise self.error(
                service_type.line,
                f"ServiceType must be 2 (SERVICE_FILE_SYSTEM_DRIVER), not {self.single(service_type)}",
            )
        start = self.required(entries, section, "StartType")
        try:
            start_type = StartType(self.number(start))
        except ValueError:
            raise self.error(
                start.line,
                f"unknown StartType {self.single(start)} (0 boot, 1 system, 2 auto, 3 demand, 4 disabled)",
            ) from None
        error_control = self.one(entries, section, "ErrorControl")
        if error_control is not None and self.number(error_control) > 3:
            raise self.error(error_control.line, f"ErrorControl must be 0 to 3, not {self.single(error_control)}")
        group_entry = self.required(entries, section, "LoadOrderGroup")
        group_text = self.single(group_entry)
        try:
            group = _canonical_group(group_text)
        except KeyError:
            raise self.error(
                group_entry.line,
                f"unknown LoadOrderGroup {group_text!r}; the groups are {', '.join(LOAD_ORDER_GROUPS)}",
            ) from None
        dependencies_entry = self.required(entries, section, "Dependencies")
        dependencies = tuple(field for field in dependencies_entry.fields if field)
        if "fltmgr" not in (dependency.casefold() for dependency in dependencies):
            raise self.error(dependencies_entry.line, "Dependencies must include FltMgr (the filter manager)")
        registry: list[_Section] = []
        for entry in entries.get("addreg", []):
            for name in entry.fields:
                if not name:
                    continue
                reg_section = self.sections.get(name.casefold())
                if reg_section is None:
                    raise self.error(entry.line, f"AddReg names the section [{name}], which is not in the file")
                if reg_section not in registry:
                    registry.append(reg_section)
        if not registry:
            raise self.error(
                section.line,
                f"[{section.name}] has no AddReg: the instances and DefaultInstance are written by AddReg sections",
            )
        return _Service(
            display_name=self.optional_text(entries, section, "DisplayName", service_name),
            description=self.optional_text(entries, section, "Description", ""),
            module=module,
            start_type=start_type,
            group=group,
            dependencies=dependencies,
            registry=registry,
        )

    # ------------------------------------------------------------------ AddReg sections

    def registry_value(self, line: _Line) -> tuple[list[str], str, _RegValue]:
        """One ``HKR,subkey,value-name,flags,data[,data...]`` line -> (key path parts, value name, value)."""
        fields = self.fields(line.text, line.number)
        if len(fields) < 5:
            raise self.error(
                line.number, f"an AddReg line is HKR,subkey,value-name,flags,data: got {len(fields)} field(s)"
            )
        root, subkey, value_name, flags_text, *data = fields
        if root.casefold() != "hkr":
            raise self.error(line.number, f"only HKR (the filter's service key) is supported, not {root!r}")
        if not value_name:
            raise self.error(line.number, "an AddReg line needs a value name")
        flags = _parse_number(flags_text) if flags_text else _REG_SZ
        if flags is None:
            raise self.error(line.number, f"AddReg flags {flags_text!r} is not a number")
        if flags not in _REG_TYPES:
            known = ", ".join(f"0x{code:08X} {name}" for code, name in _REG_TYPES.items())
            raise self.error(line.number, f"unknown AddReg flags 0x{flags:08X} (supported: {known})")
        value: ParameterValue
        if flags == _REG_MULTI_SZ:
            value = tuple(item for item in data if item)  # a REG_MULTI_SZ cannot hold an empty string
        elif len(data) != 1:
            raise self.error(line.number, f"a {_REG_TYPES[flags]} value takes one data field, got {len(data)}")
        elif flags == _REG_DWORD:
            number = _parse_number(data[0])
            if number is None or number > _DWORD_MAX:
                raise self.error(line.number, f"REG_DWORD data {data[0]!r} is not a number from 0 to 0xFFFFFFFF")
            value = number
        else:
            value = data[0]
        parts = [part for part in subkey.split("\\") if part]
        key_path = "\\".join(part.casefold() for part in parts)
        return parts, value_name, _RegValue(line.number, key_path, flags, value)

    def store(
        self, values: dict[str, _RegValue], value_name: str, new: _RegValue, what: str, seen: dict[tuple[str, str], int]
    ) -> None:
        """Set a value once per key; the same value under Instances and Parameters\\Instances is one value."""
        folded = value_name.casefold()
        first_in_key = seen.get((new.key_path, folded))
        if first_in_key is not None:
            raise self.error(new.line, f"{what} set twice in the same registry key (first at line {first_in_key})")
        seen[new.key_path, folded] = new.line
        old = values.get(folded)
        if old is None:
            values[folded] = new
        elif (old.kind, old.value) != (new.kind, new.value):
            raise self.error(
                new.line, f"{what} is {new.value!r} here but {old.value!r} at line {old.line}; the two must agree"
            )

    def read_registry(
        self, group: str, registry: list[_Section]
    ) -> tuple[tuple[InstanceSpec, ...], str, _ParameterMap]:
        instances: dict[str, _InstanceRecord] = {}
        instances_key: dict[str, _RegValue] = {}
        parameters: dict[str, _RegValue] = {}
        parameter_names: dict[str, str] = {}
        seen: dict[tuple[str, str], int] = {}
        for section in registry:
            for line in section.lines:
                parts, value_name, value = self.registry_value(line)
                folded = [part.casefold() for part in parts]
                rest, rest_folded = (parts[1:], folded[1:]) if folded[:1] == ["parameters"] else (parts, folded)
                if not rest:
                    parameter_names.setdefault(value_name.casefold(), value_name)
                    self.store(parameters, value_name, value, f"parameter {value_name!r}", seen)
                elif rest_folded == ["instances"]:
                    if value_name.casefold() != "defaultinstance":
                        self.warn(line.number, f"value {value_name!r} on the Instances key is ignored")
                        continue
                    self.expect_kind(value, _REG_SZ, "DefaultInstance")
                    self.store(instances_key, value_name, value, "DefaultInstance", seen)
                elif len(rest) == 2 and rest_folded[0] == "instances":
                    record = instances.setdefault(rest_folded[1], _InstanceRecord(rest[1], line.number, {}))
                    self.instance_value(record, value_name, value, seen)
                else:
                    key = "\\".join(parts)
                    raise self.error(
                        line.number,
                        f"unsupported registry key HKR\\{key}: fltfuse reads the service key, "
                        "Parameters, Instances and Instances\\<name> (also under Parameters\\)",
                    )
        first_registry_line = registry[0].line
        specs = tuple(self.instance_spec(record, group) for record in instances.values())
        if not specs:
            raise self.error(
                first_registry_line, 'the INF defines no instance (HKR,"Instances\\<name>","Altitude",...)'
            )
        default = instances_key.get("defaultinstance")
        if default is None:
            raise self.error(first_registry_line, "no DefaultInstance value on the Instances key")
        assert isinstance(default.value, str)
        default_record = instances.get(default.value.casefold())
        if default_record is None:
            known = ", ".join(repr(spec.name) for spec in specs)
            raise self.error(
                default.line, f"DefaultInstance {default.value!r} names no instance defined here (instances: {known})"
            )
        parameter_map = _ParameterMap((parameter_names[name], value.value) for name, value in parameters.items())
        return specs, default_record.name, parameter_map

    def expect_kind(self, value: _RegValue, kind: int, what: str) -> None:
        if value.kind != kind:
            raise self.error(value.line, f"{what} must be {_REG_TYPES[kind]}, not {_REG_TYPES[value.kind]}")

    def instance_value(
        self, record: _InstanceRecord, value_name: str, value: _RegValue, seen: dict[tuple[str, str], int]
    ) -> None:
        folded = value_name.casefold()
        if folded == "altitude":
            self.expect_kind(value, _REG_SZ, "Altitude")
            assert isinstance(value.value, str)
            if not _ALTITUDE.fullmatch(value.value):
                raise self.error(
                    value.line,
                    f"Altitude {value.value!r} of instance {record.name!r} is not a decimal string "
                    '(digits with at most one point, e.g. "370030" or "265000.5")',
                )
            self.store(record.values, value_name, value, f"instance {record.name!r}: Altitude", seen)
        elif folded == "flags":
            self.expect_kind(value, _REG_DWORD, "Flags")
            assert isinstance(value.value, int)
            if value.value & ~(InstanceSpec.NO_AUTOMATIC_ATTACH | InstanceSpec.NO_MANUAL_ATTACH):
                raise self.error(
                    value.line,
                    f"Flags 0x{value.value:X} of instance {record.name!r}: only 0x1 (no automatic attachment) "
                    "and 0x2 (no manual attachment) are defined",
                )
            self.store(record.values, value_name, value, f"instance {record.name!r}: Flags", seen)
        else:
            self.warn(value.line, f"value {value_name!r} of instance {record.name!r} is ignored")

    def instance_spec(self, record: _InstanceRecord, group: str) -> InstanceSpec:
        altitude_value = record.values.get("altitude")
        if altitude_value is None:
            raise self.error(record.line, f"instance {record.name!r} has no Altitude")
        text = altitude_value.value
        assert isinstance(text, str)
        altitude = Decimal(text)
        if altitude < SYSTEM_ALTITUDE_LIMIT and not self.allow_system_altitudes:
            raise self.error(
                altitude_value.line,
                f"altitude {text} of instance {record.name!r} is below 20000, reserved for FltMgr's "
                "infrastructure filters (allow_system_altitudes accepts it)",
            )
        if not altitude_in_group(group, altitude):
            low, high = LOAD_ORDER_GROUPS[group]
            self.warn(
                altitude_value.line,
                f"altitude {text} of instance {record.name!r} is outside its load order group {group!r} ({low}-{high})",
            )
        flags_value = record.values.get("flags")
        flags = 0 if flags_value is None else flags_value.value
        assert isinstance(flags, int)
        return InstanceSpec(record.name, altitude, text, flags)


def _join(pieces: list[tuple[str, bool]]) -> str:
    """Join a field's pieces, dropping whitespace at both ends except where quoted or substituted."""
    start, end = 0, len(pieces)
    while start < end and not pieces[start][1] and pieces[start][0].isspace():
        start += 1
    while end > start and not pieces[end - 1][1] and pieces[end - 1][0].isspace():
        end -= 1
    return "".join(text for text, _ in pieces[start:end])
