"""The INF parser: Windows INF syntax, the minifilter sections, and every error naming its file and line."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import pytest

from fltfuse._inf import (
    LOAD_ORDER_GROUPS,
    FilterInf,
    InfError,
    InstanceSpec,
    StartType,
    altitude_in_group,
    parse_inf,
)

# Modelled on Microsoft's minispy.inf: three instances, the default in the middle, the
# instance values written both under Instances and under Parameters\Instances.
SPY_INF = r""";;;
;;; Spy: logs every operation (an fltfuse port of the minispy sample)
;;;

[Version]
Signature   = "$Windows NT$"
Class       = "ActivityMonitor"              ; this is determined by the work this filter driver does
ClassGuid   = {b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}
Provider    = %ManufacturerName%
DriverVer   = 06/21/2025,1.2.0.0
CatalogFile = spy.cat
PnpLockdown = 1

[DestinationDirs]
DefaultDestDir = 12

[DefaultInstall.NTamd64]
OptionDesc = %ServiceDescription%

[DefaultInstall.NTamd64.Services]
AddService = %ServiceName%,,Spy.Service

[Spy.Service]
DisplayName    = %ServiceName%
Description    = %ServiceDescription%
ServiceBinary  = filters.spy
Dependencies   = "FltMgr"
ServiceType    = 2                            ; SERVICE_FILE_SYSTEM_DRIVER
StartType      = 3                            ; SERVICE_DEMAND_START
ErrorControl   = 1                            ; SERVICE_ERROR_NORMAL
LoadOrderGroup = "FSFilter Activity Monitor"
AddReg         = Spy.AddRegistry, Spy.Parameters

[Spy.AddRegistry]
HKR,%RegInstancesSubkeyName%,%RegDefaultInstanceValueName%,0x00000000,%DefaultInstance%
HKR,%RegInstancesSubkeyName%"\"%Instance1.Name%,%RegAltitudeValueName%,0x00000000,%Instance1.Altitude%
HKR,%RegInstancesSubkeyName%"\"%Instance1.Name%,%RegFlagsValueName%,0x00010001,%Instance1.Flags%
HKR,%RegInstancesSubkeyName%"\"%Instance2.Name%,%RegAltitudeValueName%,0x00000000,%Instance2.Altitude%
HKR,%RegInstancesSubkeyName%"\"%Instance2.Name%,%RegFlagsValueName%,0x00010001,%Instance2.Flags%
HKR,%RegInstancesSubkeyName%"\"%Instance3.Name%,%RegAltitudeValueName%,0x00000000,%Instance3.Altitude%
HKR,%RegInstancesSubkeyName%"\"%Instance3.Name%,%RegFlagsValueName%,0x00010001,%Instance3.Flags%
; the same values where Windows 11 24H2 looks for them
HKR,"Parameters\Instances","DefaultInstance",0x00000000,%DefaultInstance%
HKR,"Parameters\Instances\"%Instance1.Name%,"Altitude",0x00000000,%Instance1.Altitude%
HKR,"Parameters\Instances\"%Instance1.Name%,"Flags",0x00010001,%Instance1.Flags%
HKR,"Parameters\Instances\"%Instance2.Name%,"Altitude",0x00000000,%Instance2.Altitude%
HKR,"Parameters\Instances\"%Instance2.Name%,"Flags",0x00010001,%Instance2.Flags%
HKR,"Parameters\Instances\"%Instance3.Name%,"Altitude",0x00000000,%Instance3.Altitude%
HKR,"Parameters\Instances\"%Instance3.Name%,"Flags",0x00010001,%Instance3.Flags%

[Spy.Parameters]
HKR,,"DebugFlags",0x00010001 ,0x0
HKR,,"SupportedFeatures",0x00010001,0x3
HKR,"Parameters","Extensions",0x00010000,"doc","txt",\
    "bat"
HKR,"Parameters","LogPath",0x00020000,"%%TEMP%%\spy.log"

[Strings]
ManufacturerName            = "Contoso"
ServiceDescription          = "Spy mini-filter driver"
ServiceName                 = "Spy"
RegInstancesSubkeyName      = "Instances"
RegDefaultInstanceValueName = "DefaultInstance"
RegAltitudeValueName        = "Altitude"
RegFlagsValueName           = "Flags"

; Instances specific information.
DefaultInstance             = "Spy - Middle Instance"
Instance1.Name              = "Spy - Top Instance"
Instance1.Altitude          = "385100"
Instance1.Flags             = 0x0
Instance2.Name              = "Spy - Middle Instance"
Instance2.Altitude          = "370000"
Instance2.Flags             = 0x1          ; Suppress automatic attachments
Instance3.Name              = "Spy - Bottom Instance"
Instance3.Altitude          = "361000.5"
Instance3.Flags             = 0x2          ; Suppress manual attachments
"""

# The smallest INF fltfuse accepts, for the syntax tests.
MINIMAL_INF = r"""[Version]
Signature = "$WINDOWS NT$"
Class = ActivityMonitor

[DefaultInstall.Services]
AddService = Tiny,,Tiny.Service

[Tiny.Service]
ServiceBinary = filters.tiny
ServiceType = 2
StartType = 3
LoadOrderGroup = "FSFilter Activity Monitor"
Dependencies = FltMgr
AddReg = Tiny.AddRegistry

[Tiny.AddRegistry]
HKR,"Instances","DefaultInstance",0x00000000,"Tiny Instance"
HKR,"Instances\Tiny Instance","Altitude",0x00000000,"370030"
HKR,"Instances\Tiny Instance","Flags",0x00010001,0x0
"""


def write(tmp_path: Path, text: str, name: str = "filter.inf") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the one line of ``text`` that contains ``needle``."""
    numbers = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(numbers) == 1, f"{needle!r} is on lines {numbers}"
    return numbers[0]


def parse_error(tmp_path: Path, text: str, **kwargs: bool) -> InfError:
    with pytest.raises(InfError) as info:
        parse_inf(write(tmp_path, text), **kwargs)
    return info.value


def changed(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not unique"
    return text.replace(old, new)


def with_registry(lines: str) -> str:
    """MINIMAL_INF with more lines in its registry section."""
    return MINIMAL_INF + lines


# --------------------------------------------------------------------------- a complete INF


def test_spy_inf_parses_to_the_expected_filter(tmp_path: Path) -> None:
    path = write(tmp_path, SPY_INF, "spy.inf")
    assert parse_inf(path) == FilterInf(
        path=path,
        name="Spy",
        display_name="Spy",
        description="Spy mini-filter driver",
        class_name="ActivityMonitor",
        class_guid="{b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}",
        provider="Contoso",
        driver_ver="06/21/2025,1.2.0.0",
        module="filters.spy",
        start_type=StartType.DEMAND,
        load_order_group="FSFilter Activity Monitor",
        dependencies=("FltMgr",),
        instances=(
            InstanceSpec("Spy - Top Instance", Decimal("385100"), "385100", 0x0),
            InstanceSpec("Spy - Middle Instance", Decimal("370000"), "370000", 0x1),
            InstanceSpec("Spy - Bottom Instance", Decimal("361000.5"), "361000.5", 0x2),
        ),
        default_instance="Spy - Middle Instance",
        parameters={
            "DebugFlags": 0,
            "SupportedFeatures": 3,
            "Extensions": ("doc", "txt", "bat"),
            "LogPath": "%TEMP%\\spy.log",
        },
        warnings=(),
    )


def test_instance_none_is_the_default_instance(tmp_path: Path) -> None:
    inf = parse_inf(write(tmp_path, SPY_INF))
    assert inf.instance() is inf.instances[1]
    assert inf.instance(None).name == "Spy - Middle Instance"
    assert inf.instance("spy - top instance").altitude == Decimal(385100)  # names are case-insensitive


def test_unknown_instance_name_is_a_clear_key_error(tmp_path: Path) -> None:
    inf = parse_inf(write(tmp_path, SPY_INF))
    with pytest.raises(KeyError, match=r"filter 'Spy' has no instance 'Nope' \(its instances: 'Spy - Top Instance'"):
        inf.instance("Nope")


def test_instance_flag_properties(tmp_path: Path) -> None:
    top, middle, bottom = parse_inf(write(tmp_path, SPY_INF)).instances
    assert (top.no_automatic_attach, top.no_manual_attach) == (False, False)
    assert (middle.no_automatic_attach, middle.no_manual_attach) == (True, False)
    assert (bottom.no_automatic_attach, bottom.no_manual_attach) == (False, True)


def test_parameters_are_read_only_and_case_insensitive(tmp_path: Path) -> None:
    inf = parse_inf(write(tmp_path, SPY_INF))
    assert inf.parameters["debugflags"] == 0
    assert "EXTENSIONS" in inf.parameters
    assert list(inf.parameters) == ["DebugFlags", "SupportedFeatures", "Extensions", "LogPath"]
    with pytest.raises(TypeError):
        inf.parameters["DebugFlags"] = 1  # type: ignore[index]
    hash(inf)  # frozen all the way down


def test_undecorated_install_section_and_optional_version_keys(tmp_path: Path) -> None:
    inf = parse_inf(write(tmp_path, MINIMAL_INF))
    assert (inf.name, inf.display_name, inf.description) == ("Tiny", "Tiny", "")
    assert (inf.class_guid, inf.provider, inf.driver_ver) == ("", "", "")
    assert inf.instance() == InstanceSpec("Tiny Instance", Decimal("370030"), "370030", 0)


def test_start_type_in_hex_and_several_dependencies(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "StartType = 3", "StartType = 0x0")
    text = changed(text, "Dependencies = FltMgr", 'Dependencies = "FltMgr", "Other"')
    inf = parse_inf(write(tmp_path, text))
    assert inf.start_type is StartType.BOOT
    assert inf.dependencies == ("FltMgr", "Other")


# --------------------------------------------------------------------------- syntax


def test_tokens_are_case_insensitive_and_double_percent_is_a_percent(tmp_path: Path) -> None:
    text = changed(
        MINIMAL_INF, "Class = ActivityMonitor", "Class = ActivityMonitor\nProvider = %COMPANY% 100%% %company%"
    )
    text += '[Strings]\nCompany = "Contoso"\n'
    assert parse_inf(write(tmp_path, text)).provider == "Contoso 100% Contoso"


def test_quoted_fields_keep_commas_semicolons_spaces_and_doubled_quotes(tmp_path: Path) -> None:
    text = with_registry('HKR,,"Banner",0x00000000,"  say ""hi""; a, b  "  ; a comment\n')
    assert parse_inf(write(tmp_path, text)).parameters["Banner"] == '  say "hi"; a, b  '


def test_string_values_are_kept_exactly_when_substituted(tmp_path: Path) -> None:
    text = with_registry('HKR,,"Banner",0x00000000,%Banner%\n[Strings]\nBanner = "  a, b;c  "\n')
    assert parse_inf(write(tmp_path, text)).parameters["Banner"] == "  a, b;c  "


def test_continued_line_and_comments_and_blank_lines(tmp_path: Path) -> None:
    text = with_registry('\n; comment only\n\nHKR,,"List",0x00010000,"a", \\\n   "b" ; tail\n')
    assert parse_inf(write(tmp_path, text)).parameters["List"] == ("a", "b")


def test_section_names_are_case_insensitive_and_repeated_sections_merge(tmp_path: Path) -> None:
    text = MINIMAL_INF.replace("[Tiny.AddRegistry]", "[TINY.ADDREGISTRY]")
    text += '[tiny.addregistry]\nHKR,,"Later",0x00010001,7\n'
    assert parse_inf(write(tmp_path, text)).parameters == {"Later": 7}


def test_utf16_file_like_microsofts_samples(tmp_path: Path) -> None:
    path = tmp_path / "utf16.inf"
    path.write_text("\ufeff" + MINIMAL_INF.replace("\n", "\r\n"), encoding="utf-16-le")
    assert parse_inf(path).name == "Tiny"


def test_undefined_token_is_an_error_with_its_line(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "Class = ActivityMonitor", "Class = ActivityMonitor\nProvider = %Nobody%")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (line_of(text, "%Nobody%"), "undefined string token %Nobody% (not in [Strings])")


def test_undefined_token_in_a_section_fltfuse_does_not_read(tmp_path: Path) -> None:
    text = MINIMAL_INF + "[SourceDisksNames]\n1 = %DiskId1%,,,\n"
    assert parse_error(tmp_path, text).line == line_of(text, "%DiskId1%")


def test_lone_percent_is_an_error(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "Class = ActivityMonitor", "Class = ActivityMonitor\nProvider = 100% sure")
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "100% sure")
    assert "write %% for a literal percent sign" in err.message


def test_unterminated_quote(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "Dependencies = FltMgr", 'Dependencies = "FltMgr')
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "Dependencies")
    assert err.message.startswith("unterminated quoted string")


def test_key_line_before_any_section(tmp_path: Path) -> None:
    text = "; header comment\nSignature = x\n" + MINIMAL_INF
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (2, "'Signature = x' is outside any section (the file must start with one)")


def test_error_in_a_continued_line_names_its_first_line(tmp_path: Path) -> None:
    text = with_registry('HKR,,"List",0x00010000,"a",\\\n  %Missing%\n')
    assert parse_error(tmp_path, text).line == line_of(text, '"List"')


def test_inf_error_formats_path_and_line(tmp_path: Path) -> None:
    err = InfError(tmp_path / "x.inf", 7, "broken")
    assert str(err) == f"{tmp_path / 'x.inf'}:7: broken"
    assert (err.path, err.line, err.message) == (tmp_path / "x.inf", 7, "broken")


def test_missing_file_is_an_error_on_line_zero(tmp_path: Path) -> None:
    with pytest.raises(InfError) as info:
        parse_inf(tmp_path / "absent.inf")
    assert info.value.line == 0
    assert str(info.value).startswith(f"{tmp_path / 'absent.inf'}:0: cannot read the INF file")


# --------------------------------------------------------------------------- [Version] and the service


def test_missing_version_section(tmp_path: Path) -> None:
    text = MINIMAL_INF.replace("[Version]", "[NotVersion]")
    path = write(tmp_path, text)
    with pytest.raises(InfError) as info:
        parse_inf(path)
    assert str(info.value) == f"{path}:0: no [Version] section"


def test_wrong_signature(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, '"$WINDOWS NT$"', '"$Chicago$"')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (2, "Signature must be \"$WINDOWS NT$\", not '$Chicago$'")


def test_missing_signature_names_the_section_header(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, 'Signature = "$WINDOWS NT$"\n', "")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (1, "[Version] has no Signature")


def test_unknown_class_is_a_logged_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = changed(MINIMAL_INF, "Class = ActivityMonitor", "Class = Gizmo")
    path = write(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="fltfuse.inf"):
        inf = parse_inf(path)
    assert inf.class_name == "Gizmo"
    assert len(inf.warnings) == 1
    assert inf.warnings[0].startswith(f"{path}:3: unknown Class 'Gizmo'; the file system filter classes are")
    assert caplog.messages == list(inf.warnings)


def test_missing_class(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "Class = ActivityMonitor\n", "")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (1, "[Version] has no Class")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("DriverVer = 13/01/2025,1.0", "DriverVer date '13/01/2025' is not a date MM/DD/YYYY"),
        ("DriverVer = 2025-01-01", "DriverVer date '2025-01-01' is not a date MM/DD/YYYY"),
        ("DriverVer = 01/31/2025,1.x", "DriverVer version '1.x' is not w.x.y.z"),
        ("ClassGuid = b86dff51", "ClassGuid 'b86dff51' is not a GUID like {b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}"),
        ("Class = Encryption", "Class given twice in [Version] (first at line 3)"),
    ],
)
def test_malformed_version_values(tmp_path: Path, line: str, message: str) -> None:
    text = changed(MINIMAL_INF, "Class = ActivityMonitor\n", f"Class = ActivityMonitor\n{line}\n")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (4, message)


def test_missing_services_section(tmp_path: Path) -> None:
    text = MINIMAL_INF.replace("[DefaultInstall.Services]", "[DefaultInstall]")
    err = parse_error(tmp_path, text)
    assert err.line == 0
    assert err.message.startswith("no [DefaultInstall.Services]")


def test_missing_service_section_names_the_add_service_line(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "AddService = Tiny,,Tiny.Service", "AddService = Tiny,,Tiny.Svc")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (6, "AddService names the section [Tiny.Svc], which is not in the file")


@pytest.mark.parametrize("key", ["LoadOrderGroup", "Dependencies", "ServiceBinary", "ServiceType", "StartType"])
def test_missing_required_service_key_names_the_section_header(tmp_path: Path, key: str) -> None:
    lines = [line for line in MINIMAL_INF.splitlines(keepends=True) if not line.startswith(key)]
    text = "".join(lines)
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (line_of(text, "[Tiny.Service]"), f"[Tiny.Service] has no {key}")


def test_dependencies_without_fltmgr(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "Dependencies = FltMgr", "Dependencies = Tcpip")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "Dependencies"),
        "Dependencies must include FltMgr (the filter manager)",
    )


def test_unknown_load_order_group(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, '"FSFilter Activity Monitor"', '"FSFilter Fun"')
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "LoadOrderGroup")
    assert err.message.startswith("unknown LoadOrderGroup 'FSFilter Fun'; the groups are Filter, FSFilter Top,")


def test_service_type_must_be_2(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "ServiceType = 2", "ServiceType = 1")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "ServiceType"),
        "ServiceType must be 2 (SERVICE_FILE_SYSTEM_DRIVER), not 1",
    )


@pytest.mark.parametrize("value", ["5", "demand"])
def test_unknown_start_type(tmp_path: Path, value: str) -> None:
    text = changed(MINIMAL_INF, "StartType = 3", f"StartType = {value}")
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "StartType")
    assert value in err.message


@pytest.mark.parametrize("binary", ["filters/tiny.py", "1filter", "filters..tiny", "filters.class", "%%12%%\\tiny.sys"])
def test_service_binary_must_be_a_module_name(tmp_path: Path, binary: str) -> None:
    text = changed(MINIMAL_INF, "ServiceBinary = filters.tiny", f"ServiceBinary = {binary}")
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "ServiceBinary")
    assert err.message.startswith("ServiceBinary must name the Python module that implements the filter")


def test_add_reg_naming_a_missing_section(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, "AddReg = Tiny.AddRegistry", "AddReg = Tiny.AddRegistry, Tiny.Gone")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "Tiny.Gone"),
        "AddReg names the section [Tiny.Gone], which is not in the file",
    )


# --------------------------------------------------------------------------- AddReg lines


def test_add_reg_line_with_too_few_fields(tmp_path: Path) -> None:
    text = with_registry('HKR,,"DebugFlags",0x00010001\n')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "DebugFlags"),
        "an AddReg line is HKR,subkey,value-name,flags,data: got 4 field(s)",
    )


def test_add_reg_unknown_flags(tmp_path: Path) -> None:
    text = with_registry('HKR,,"Blob",0x00000001,1,2,3\n')
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "Blob")
    assert err.message.startswith("unknown AddReg flags 0x00000001 (supported: 0x00000000 REG_SZ,")


@pytest.mark.parametrize("data", ["ten", "0x", "-1", "0x100000000"])
def test_add_reg_dword_that_is_not_a_number(tmp_path: Path, data: str) -> None:
    text = with_registry(f'HKR,,"DebugFlags",0x00010001,{data}\n')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "DebugFlags"),
        f"REG_DWORD data {data!r} is not a number from 0 to 0xFFFFFFFF",
    )


def test_add_reg_only_hkr(tmp_path: Path) -> None:
    text = with_registry('HKLM,"Software\\Spy","X",0x00000000,"y"\n')
    assert parse_error(tmp_path, text).line == line_of(text, "HKLM")


def test_add_reg_unsupported_subkey(tmp_path: Path) -> None:
    text = with_registry('HKR,"Parameters\\Deep\\Key","X",0x00000000,"y"\n')
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "Deep")
    assert err.message.startswith("unsupported registry key HKR\\Parameters\\Deep\\Key")


# --------------------------------------------------------------------------- instances and altitudes


@pytest.mark.parametrize("altitude", ["12a", "1.2.3", "", "-5", "1e5", "370000.", " 370000"])
def test_invalid_altitude_strings(tmp_path: Path, altitude: str) -> None:
    text = changed(MINIMAL_INF, '"370030"', f'"{altitude}"')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "Altitude"),
        f"Altitude {altitude!r} of instance 'Tiny Instance' is not a decimal string "
        '(digits with at most one point, e.g. "370030" or "265000.5")',
    )


def test_altitudes_are_decimals_not_floats(tmp_path: Path) -> None:
    registry = "".join(
        f'HKR,"Instances\\{name}","Altitude",0x00000000,"{altitude}"\n'
        for name, altitude in [("A", "265001"), ("B", "265000.5"), ("C", "265000"), ("D", "265000.50000000000000001")]
    )
    text = changed(with_registry(registry), '"FSFilter Activity Monitor"', '"FSFilter Content Screener"')
    text = changed(text, '"370030"', '"265000.7"')
    inf = parse_inf(write(tmp_path, text))
    a, b, c, d = (inf.instance(name).altitude for name in "ABCD")
    assert c < b < a
    assert b < d  # a float would call these equal
    assert all(isinstance(x, Decimal) for x in (a, b, c, d))
    assert inf.instance("D").altitude_text == "265000.50000000000000001"


def test_altitude_outside_its_group_is_a_logged_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = changed(MINIMAL_INF, '"370030"', '"325000"')
    path = write(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="fltfuse.inf"):
        inf = parse_inf(path)
    assert inf.instance().altitude == Decimal(325000)
    expected = (
        f"{path}:{line_of(text, 'Altitude')}: altitude 325000 of instance 'Tiny Instance' is outside its "
        "load order group 'FSFilter Activity Monitor' (360000-389999)"
    )
    assert inf.warnings == (expected,)
    assert caplog.messages == [expected]


def test_altitude_below_20000_is_an_error_unless_allowed(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, '"370030"', '"19999.5"')
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "Altitude")
    assert err.message.startswith("altitude 19999.5 of instance 'Tiny Instance' is below 20000")

    inf = parse_inf(write(tmp_path, text), allow_system_altitudes=True)
    assert inf.instance().altitude == Decimal("19999.5")
    assert len(inf.warnings) == 1 and "outside its load order group" in inf.warnings[0]

    infrastructure = changed(text, '"FSFilter Activity Monitor"', '"FSFilter Infrastructure"')
    assert parse_inf(write(tmp_path, infrastructure), allow_system_altitudes=True).warnings == ()


def test_instance_flags_with_other_bits_are_an_error(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, '"Flags",0x00010001,0x0', '"Flags",0x00010001,0x5')
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, '"Flags"')
    assert err.message.startswith("Flags 0x5 of instance 'Tiny Instance': only 0x1")


def test_duplicate_instance_is_an_error(tmp_path: Path) -> None:
    text = with_registry('HKR,"Instances\\TINY INSTANCE","Altitude",0x00000000,"370040"\n')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "TINY INSTANCE"),
        "instance 'Tiny Instance': Altitude set twice in the same registry key "
        f"(first at line {line_of(text, '370030')})",
    )


def test_instances_and_parameters_instances_must_agree(tmp_path: Path) -> None:
    text = with_registry('HKR,"Parameters\\Instances\\Tiny Instance","Altitude",0x00000000,"370031"\n')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "370031"),
        f"instance 'Tiny Instance': Altitude is '370031' here but '370030' at line {line_of(text, '370030')}; "
        "the two must agree",
    )


def test_default_instance_must_name_a_defined_instance(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, '"DefaultInstance",0x00000000,"Tiny Instance"', '"DefaultInstance",0x00000000,"Other"')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "DefaultInstance"),
        "DefaultInstance 'Other' names no instance defined here (instances: 'Tiny Instance')",
    )


def test_missing_default_instance_names_the_registry_section(tmp_path: Path) -> None:
    text = "".join(line for line in MINIMAL_INF.splitlines(keepends=True) if "DefaultInstance" not in line)
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (
        line_of(text, "[Tiny.AddRegistry]"),
        "no DefaultInstance value on the Instances key",
    )


def test_instance_values_must_have_their_registry_types(tmp_path: Path) -> None:
    text = changed(MINIMAL_INF, '"Altitude",0x00000000', '"Altitude",0x00010001')
    text = changed(text, '"370030"', "370030")
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (line_of(text, "Altitude"), "Altitude must be REG_SZ, not REG_DWORD")


def test_unknown_instance_values_are_ignored_with_a_warning(tmp_path: Path) -> None:
    text = with_registry('HKR,"Instances\\Tiny Instance","Colour",0x00000000,"blue"\n')
    path = write(tmp_path, text)
    assert parse_inf(path).warnings == (
        f"{path}:{line_of(text, 'Colour')}: value 'Colour' of instance 'Tiny Instance' is ignored",
    )


def test_inf_without_instances_is_an_error(tmp_path: Path) -> None:
    text = "".join(line for line in MINIMAL_INF.splitlines(keepends=True) if "Instances\\" not in line)
    err = parse_error(tmp_path, text)
    assert err.line == line_of(text, "[Tiny.AddRegistry]")
    assert err.message.startswith("the INF defines no instance")


def test_instance_without_altitude_is_an_error(tmp_path: Path) -> None:
    text = with_registry('HKR,"Instances\\Half","Flags",0x00010001,0x1\n')
    err = parse_error(tmp_path, text)
    assert (err.line, err.message) == (line_of(text, "Half"), "instance 'Half' has no Altitude")


# --------------------------------------------------------------------------- load order groups


def test_load_order_group_table() -> None:
    assert LOAD_ORDER_GROUPS["FSFilter Activity Monitor"] == (Decimal(360000), Decimal(389999))
    assert LOAD_ORDER_GROUPS["FSFilter Infrastructure"] == (Decimal(0), Decimal(19999))
    assert LOAD_ORDER_GROUPS["FSFilter Imaging"] == (Decimal(170000), Decimal(175000))
    assert len(LOAD_ORDER_GROUPS) == 26
    lows = [low for low, _ in LOAD_ORDER_GROUPS.values()]
    assert lows == sorted(lows, reverse=True)  # the table runs from the top of the stack down


def test_altitude_in_group() -> None:
    group = "FSFilter Activity Monitor"
    assert altitude_in_group(group, Decimal("360000"))
    assert altitude_in_group(group, Decimal("389999.9"))  # a fraction belongs to its integer
    assert not altitude_in_group(group, Decimal("390000"))
    assert not altitude_in_group(group, Decimal("359999.99"))
    assert altitude_in_group("fsfilter bottom", Decimal(45000))
    with pytest.raises(KeyError, match="unknown load order group 'FSFilter Nope'"):
        altitude_in_group("FSFilter Nope", Decimal(1))


# --------------------------------------------------------------------------- --param overrides


def test_with_parameters_keeps_each_type(tmp_path: Path) -> None:
    inf = parse_inf(write(tmp_path, SPY_INF))
    changed_inf = inf.with_parameters(
        {"debugflags": "0x10", "Extensions": "exe, dll,,py", "LogPath": "/var/log/spy", "NewKey": "42"}
    )
    assert changed_inf.parameters == {
        "DebugFlags": 16,
        "SupportedFeatures": 3,
        "Extensions": ("exe", "dll", "py"),
        "LogPath": "/var/log/spy",
        "NewKey": "42",
    }
    assert inf.parameters["DebugFlags"] == 0  # the original is unchanged
    assert changed_inf.instances == inf.instances


def test_with_parameters_refuses_a_non_number_for_a_dword(tmp_path: Path) -> None:
    inf = parse_inf(write(tmp_path, SPY_INF))
    with pytest.raises(ValueError, match=r"parameter 'SupportedFeatures' of filter 'Spy' is a REG_DWORD: 'lots'"):
        inf.with_parameters({"SupportedFeatures": "lots"})
