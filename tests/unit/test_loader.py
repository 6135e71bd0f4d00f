"""Finding filters by name, importing their module, and their default instance."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from fltfuse import MajorFunction
from fltfuse._inf import InfError
from fltfuse._loader import FilterNotFound, find_inf, load, load_filter

PROJECT_INF = Path(__file__).resolve().parents[2] / "inf"


def write_inf(
    directory: Path, name: str, module: str, altitude: str = "370100", flags: str = "0x0", start: int = 3
) -> Path:
    path = directory / f"{name}.inf"
    path.write_text(
        textwrap.dedent(
            f"""\
            [Version]
            Signature = "$Windows NT$"
            Class     = "ActivityMonitor"
            ClassGuid = {{b86dff51-a31e-4bac-b3cf-e8cfe75c9fc2}}
            Provider  = "tests"
            DriverVer = 11/21/2026,1.0.0.0

            [DefaultInstall.Services]
            AddService = {name},,Svc

            [Svc]
            ServiceBinary  = {module}
            Dependencies   = "FltMgr"
            ServiceType    = 2
            StartType      = {start}
            ErrorControl   = 1
            LoadOrderGroup = "FSFilter Activity Monitor"
            AddReg         = Svc.Reg

            [Svc.Reg]
            HKR,"Instances","DefaultInstance",0x00000000,"Main"
            HKR,"Instances\\Main","Altitude",0x00000000,"{altitude}"
            HKR,"Instances\\Main","Flags",0x00010001,{flags}
            HKR,"Parameters","Extensions",0x00010000,"doc","txt"
            HKR,"Parameters","Timeout",0x00010001,30
            """
        )
    )
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/infs/counter.inf naming tmp/myfilters/counter.py."""
    (tmp_path / "infs").mkdir()
    (tmp_path / "myfilters").mkdir()
    (tmp_path / "myfilters" / "__init__.py").write_text("")
    (tmp_path / "myfilters" / "counter.py").write_text(
        textwrap.dedent(
            """\
            from fltfuse import FilterRegistration, MajorFunction, OperationRegistration, PreopCallbackStatus

            def pre(cbd, objects):
                return PreopCallbackStatus.SUCCESS_NO_CALLBACK

            REGISTRATION = FilterRegistration(operations=(OperationRegistration(MajorFunction.READ, pre),))
            """
        )
    )
    write_inf(tmp_path / "infs", "counter", "myfilters.counter")
    return tmp_path


def test_the_project_samples_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLTFUSE_FILTER_PATH", raising=False)
    [passthrough, null] = load(["passthrough", "NullFilter"])
    assert (passthrough.name, passthrough.altitude) == ("PassThrough Instance", Decimal("370030"))
    assert MajorFunction.READ in passthrough.filter.operations
    assert (null.name, null.altitude, null.filter.operations) == ("NullFilter Instance", Decimal("47000"), {})


def test_a_filter_from_a_directory_with_its_parameters(tree: Path) -> None:
    [instance] = load(["counter"], [tree / "infs"], {"counter": {"Timeout": "5"}})
    assert instance.altitude == Decimal("370100")
    assert set(instance.filter.operations) == {MajorFunction.READ}
    assert instance.filter.parameters["Timeout"] == 5
    assert tuple(instance.filter.parameters["Extensions"]) == ("doc", "txt")


def test_the_search_path_from_the_environment(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLTFUSE_FILTER_PATH", str(tree / "infs"))
    assert find_inf("counter").name == "counter"


def test_no_automatic_attachment(tree: Path) -> None:
    write_inf(tree / "infs", "manual", "myfilters.counter", flags="0x1")
    assert load(["manual"], [tree / "infs"]) == []


def test_an_unknown_filter(tree: Path) -> None:
    with pytest.raises(FilterNotFound, match="no INF for filter 'ghost'"):
        find_inf("ghost", [tree / "infs"])


def test_a_module_that_cannot_be_imported_names_the_inf(tree: Path) -> None:
    write_inf(tree / "infs", "missing", "myfilters.not_there")
    with pytest.raises(InfError) as info:
        load_filter(find_inf("missing", [tree / "infs"]))
    assert str(tree / "infs" / "missing.inf") in str(info.value)
    assert "myfilters.not_there" in str(info.value)


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """A third-party filter package 'pipfilter' as pip would install it, with its entry point."""
    site = tmp_path / "site"
    (site / "pipfilter").mkdir(parents=True)
    (site / "pipfilter" / "__init__.py").write_text(
        "from fltfuse import FilterRegistration\nREGISTRATION = FilterRegistration()\n"
    )
    write_inf(site / "pipfilter", "pipfilter", "pipfilter", altitude="385100")
    dist = site / "pipfilter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pipfilter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fltfuse.filters]\npipfilter = pipfilter\n")
    sys.path.insert(0, str(site))
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("pipfilter", None)


def test_an_installed_package_is_found_through_its_entry_point(installed: Path) -> None:
    [instance] = load(["pipfilter"])
    assert (instance.filter.name, instance.altitude) == ("pipfilter", Decimal("385100"))


def test_parameters_are_looked_up_as_in_the_registry(tree: Path) -> None:
    [instance] = load(["counter"], [tree / "infs"])
    assert instance.filter.parameters["timeout"] == instance.filter.parameters["Timeout"] == 30


def test_auto_start_filters_are_the_default_stack_and_disabled_ones_never_load(tree: Path) -> None:
    write_inf(tree / "infs", "always", "myfilters.counter", altitude="370200", start=2)
    write_inf(tree / "infs", "never", "myfilters.counter", altitude="370300", start=4)
    [instance] = load([], [tree / "infs"])  # demand-start 'counter' is not loaded unless asked for
    assert instance.filter.name == "always"
    assert [i.filter.name for i in load(["counter"], [tree / "infs"])] == ["always", "counter"]
    with pytest.raises(InfError, match="filter never is disabled"):
        load(["never"], [tree / "infs"])
