"""The minispy sample in-process: records of every request, three instances in altitude order, the bounded
buffer and its drop notices, the port (GET_LOG with long polls, GET_STATS, one reader), and the minispy
command's output and filters against an in-process port."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from filters.minispy import Processes, open_flags, protocol, user
from fltfuse import (
    Filter,
    FilterRegistration,
    Instance,
    InstanceTeardownFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PortDisconnectedError,
    PortRefusedError,
    PreopCallbackStatus,
    _loader,
)
from fltfuse._process import process_name
from fltfuse._stack import StackError
from fltfuse.port import FilterPort, connect_communication_port
from fltfuse.testing import InProcessVolume

ME = os.getpid()
TOP, MIDDLE, BOTTOM = protocol.INSTANCES.values()


class Reader:
    """A connection to MiniSpyPort from a thread, as the minispy command makes it."""

    def __init__(self, port: FilterPort):
        self.port = port

    @classmethod
    async def connect(cls, vol: InProcessVolume) -> Reader:
        path = vol.port_path(protocol.PORT_NAME)
        return cls(await trio.to_thread.run_sync(connect_communication_port, path))

    async def send(self, message: bytes, capacity: int = protocol.REPLY_CAPACITY) -> bytes:
        return await trio.to_thread.run_sync(partial(self.port.send_message, message, reply_capacity=capacity))

    async def ask(self, message: bytes, capacity: int = protocol.REPLY_CAPACITY) -> dict[str, Any]:
        return protocol.decode(await self.send(message, capacity))

    async def log(self) -> list[dict[str, Any]]:
        """Every entry the buffer holds (several GET_LOGs if need be), oldest first."""
        entries: list[dict[str, Any]] = []
        while True:
            answer = await self.ask(protocol.get_log(0))
            entries += answer["entries"]
            if not answer["more"]:
                return entries

    async def records(self) -> list[dict[str, Any]]:
        return [e for e in await self.log() if e["type"] == "record"]

    async def stats(self) -> dict[str, int]:
        stats: dict[str, int] = (await self.ask(protocol.get_stats()))["stats"]
        return stats

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.port.close)


@asynccontextmanager
async def minispy(directory: Path, *more: Any, **parameters: str) -> AsyncIterator[tuple[InProcessVolume, Reader]]:
    """A volume of ``directory`` with minispy's default (Top) instance, and a reader connected to its port."""
    directory.mkdir(exist_ok=True)
    async with InProcessVolume(directory, ["minispy", *more], parameters={"minispy": parameters}) as vol:
        reader = await Reader.connect(vol)
        try:
            yield vol, reader
        finally:
            await reader.close()


def spy_filter(vol: InProcessVolume) -> Filter:
    return next(f for f in vol.filters if f.name == "minispy")


def inf_instance(vol: InProcessVolume, short: str) -> Instance:
    """One of the INF's three instances of the volume's minispy filter."""
    spec = _loader.find_inf("minispy").instance(protocol.INSTANCES[short])
    return Instance(spy_filter(vol), spec.name, spec.altitude)


def of(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["name"] is not None and r["name"].endswith("/" + name)]


# -- records ------------------------------------------------------------------------------------


async def test_each_request_is_logged_with_its_name_requestor_outcome_and_arguments(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol") as (vol, reader):
        await vol.write_file("a.txt", b"hello")
        await vol.rename("a.txt", "b.txt")
        with pytest.raises(FileNotFoundError):
            await vol.read_file("missing")
        records = await reader.records()

    volume = str(vol.directory.absolute())
    assert [(r["major"], r["minor"], r["name"], r["status"], r["errno"]) for r in records] == [
        ("LOOKUP", None, f"{volume}/a.txt", "OBJECT_NAME_NOT_FOUND", "ENOENT"),
        ("CREATE", None, f"{volume}/a.txt", "SUCCESS", None),
        ("WRITE", None, f"{volume}/a.txt", "SUCCESS", None),
        ("CLEANUP", None, f"{volume}/a.txt", "SUCCESS", None),
        ("CLOSE", None, f"{volume}/a.txt", "SUCCESS", None),
        ("SET_INFORMATION", "RENAME_EX", f"{volume}/a.txt", "SUCCESS", None),
        ("LOOKUP", None, f"{volume}/missing", "OBJECT_NAME_NOT_FOUND", "ENOENT"),
    ]
    create, write, rename = records[1], records[2], records[5]
    assert create["arguments"] == {
        "disposition": "OVERWRITE_IF",
        "file_type": "REGULAR",
        "flags": "O_WRONLY|O_CREAT|O_TRUNC",
        "mode": "0o644",
        "handle_requested": True,
    }
    assert (write["arguments"], write["information"]) == ({"offset": 0, "length": 5}, 5)
    assert rename["arguments"] == {"destination": f"{volume}/b.txt"}
    assert {(r["pid"], r["tid"], r["process"]) for r in records} == {(ME, ME, process_name(ME))}
    assert {(r["instance"], r["altitude"]) for r in records} == {("Minispy - Top Instance", "385100")}
    assert all(r["flags"] == ["IRP_OPERATION"] and r["record_flags"] == [] for r in records)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["pre_time"] <= r["post_time"] for r in records)
    assert all(a["post_time"] <= b["pre_time"] for a, b in itertools.pairwise(records))
    assert abs(records[0]["pre_time"] - time.time_ns()) < 60e9  # wall-clock time


RECORD_FIELDS = (
    "type",
    "seq",
    "instance",
    "altitude",
    "major",
    "minor",
    "name",
    "inode",
    "pid",
    "tid",
    "process",
    "status",
    "errno",
    "information",
    "pre_time",
    "post_time",
    "flags",
    "record_flags",
    "arguments",
)


async def test_entries_have_the_stable_fields_the_protocol_documents(tmp_path: Path) -> None:
    """What ``minispy --json`` prints is these entries: their field names are an interface (version 1)."""
    async with minispy(tmp_path / "vol", MaxRecords="1") as (vol, reader):
        for name in ("one", "two"):
            with pytest.raises(FileNotFoundError):
                await vol.lookup(name)
        record, notice = await reader.log()
    assert tuple(record) == RECORD_FIELDS
    assert tuple(notice) == ("type", "count", "time") and notice["type"] == "dropped"
    documented = protocol.__doc__ or ""
    for field in RECORD_FIELDS[1:]:
        assert f'"{field}"' in documented, field
    assert '{"type": "record", "seq"' in documented and '{"type": "dropped", "count": N, "time": NS}' in documented


async def test_a_request_whose_name_cannot_be_had_is_logged_by_inode_and_still_succeeds(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol") as (vol, reader):
        handle = await vol.open("doomed", os.O_RDWR | os.O_CREAT)
        inode = os.stat(tmp_path / "vol" / "doomed").st_ino
        await vol.unlink("doomed")
        assert await vol.write(handle, 0, b"still writable") == 14
        await vol.close_handle(handle)
        records = await reader.records()
    write = next(r for r in records if r["major"] == "WRITE")
    assert (write["name"], write["inode"], write["status"], write["information"]) == (None, inode, "SUCCESS", 14)
    assert f"<inode {inode}>  offset=0 length=14" in user._line(write)  # what the table shows for it


async def test_cache_only_name_queries_that_miss_leave_records_without_names(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "f").write_bytes(b"x")
    async with minispy(tmp_path / "vol", NameQueryMethod="0x200") as (vol, reader):
        await vol.read_file("f")
        records = await reader.records()
    assert records and all(r["name"] is None and r["status"] == "SUCCESS" for r in records)
    assert {r["major"] for r in records} == {"LOOKUP", "CREATE", "READ", "CLEANUP", "CLOSE"}


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        (os.O_RDONLY, "O_RDONLY"),
        (os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, "O_RDWR|O_APPEND|O_CLOEXEC"),
        (os.O_WRONLY | os.O_SYNC, "O_WRONLY|O_SYNC"),
        (os.O_WRONLY | os.O_DSYNC | 0o100000, "O_WRONLY|O_DSYNC|O_LARGEFILE"),  # x86-64's O_LARGEFILE
        (os.O_RDONLY | 0o10000000000, "O_RDONLY|0o10000000000"),  # no name: in octal
    ],
)
def test_open_flags_read_as_their_names(flags: int, text: str) -> None:
    assert open_flags(flags) == text


def test_a_process_that_exited_is_still_named_by_what_was_seen_of_it() -> None:
    processes = Processes()
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while process_name(child.pid) != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)  # Popen may return before the kernel renamed the child at its exec
        assert processes.identify(child.pid) == (child.pid, "sleep")
    finally:
        child.kill()
        child.wait()
    assert processes.identify(child.pid) == (child.pid, "sleep")  # gone from /proc now: remembered
    assert Processes().identify(child.pid) == (child.pid, "?")


# -- three instances ------------------------------------------------------------------------------


async def test_three_instances_log_each_request_pre_top_down_and_post_bottom_up(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "f").write_bytes(b"data")
    async with minispy(tmp_path / "vol") as (vol, reader):
        middle, bottom = inf_instance(vol, "middle"), inf_instance(vol, "bottom")
        vol.stack.attach(middle)
        vol.stack.attach(bottom)
        assert await vol.read_file("f") == b"data"
        records = await reader.records()

        assert len(records) % 3 == 0 and {r["major"] for r in records} >= {"CREATE", "READ", "CLEANUP", "CLOSE"}
        for i in range(0, len(records), 3):
            b, m, t = records[i : i + 3]  # logged at post: the bottom instance's post first
            assert [r["instance"] for r in (t, m, b)] == list(protocol.INSTANCES.values())
            assert [r["altitude"] for r in (t, m, b)] == ["385100", "370000", "361000"]
            assert len({(r["major"], r["minor"], r["name"], r["status"]) for r in (t, m, b)}) == 1
            assert m["seq"] == t["seq"] + 1 and b["seq"] == t["seq"] + 2  # pre order: top, middle, bottom
            assert t["pre_time"] < m["pre_time"] < b["pre_time"] < b["post_time"] < m["post_time"] < t["post_time"]

        vol.stack.query_teardown(middle)
        await vol.stack.detach(middle, InstanceTeardownFlags.MANUAL)
        await vol.read_file("f")
        after = await reader.records()
    assert after and len(after) == len(records) * 2 // 3
    assert {r["instance"] for r in after} == {"Minispy - Top Instance", "Minispy - Bottom Instance"}


async def test_a_post_drained_by_a_detach_is_logged_without_an_outcome(tmp_path: Path) -> None:
    """An instance detached while a request is held below it: its post runs with DRAINING; the record says so."""
    entered, release = trio.Event(), trio.Event()

    async def hold_reads(cbd: Any, objects: Any) -> PreopCallbackStatus:
        entered.set()
        await release.wait()
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK

    holder = Filter("holder", FilterRegistration(operations=(OperationRegistration(MajorFunction.READ, hold_reads),)))
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "f").write_bytes(b"data")
    async with minispy(tmp_path / "vol", (holder, "100000")) as (vol, reader):
        top = next(i for i in vol.stack.instances if i.filter.name == "minispy")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.read_file, "f")
            await entered.wait()
            await vol.stack.detach(top, InstanceTeardownFlags.MANUAL)
            release.set()
        records = await reader.records()
    read = records[-1]
    assert (read["major"], read["record_flags"], read["status"], read["errno"]) == ("READ", ["DRAINING"], None, None)
    assert [r["major"] for r in records] == ["LOOKUP", "CREATE", "READ"]  # nothing after the detach
    assert "(draining)" in user._line(read)


# -- the buffer ---------------------------------------------------------------------------------


async def test_a_full_buffer_drops_new_records_counts_them_and_says_where(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol", MaxRecords="5") as (vol, reader):
        for i in range(8):
            with pytest.raises(FileNotFoundError):
                await vol.lookup(f"nothing-{i}")  # one LOOKUP each
        assert await reader.stats() == {"logged": 5, "dropped": 3, "buffered": 5, "capacity": 5, "sequence": 8}
        entries = await reader.log()
        assert [e["type"] for e in entries] == ["record"] * 5 + ["dropped"]
        assert [e["seq"] for e in entries[:5]] == [1, 2, 3, 4, 5]  # the oldest are kept
        assert entries[5]["count"] == 3
        assert await reader.log() == []  # each drop is reported once

        for i in range(7):
            with pytest.raises(FileNotFoundError):
                await vol.lookup(f"again-{i}")
        first = await reader.ask(protocol.get_log(0), capacity=protocol.ANSWER_OVERHEAD + 1000)
        with pytest.raises(FileNotFoundError):
            await vol.lookup("after")  # room again: the notice goes before this record
        rest = await reader.log()
        stats = await reader.stats()
    taken = first["entries"] + rest
    assert first["more"] and 0 < len(first["entries"]) < 5
    assert [e["type"] for e in taken] == ["record"] * 5 + ["dropped", "record"]
    assert [e.get("seq") for e in taken] == [9, 10, 11, 12, 13, None, 16]
    assert taken[5]["count"] == 2
    assert stats == {"logged": 11, "dropped": 5, "buffered": 0, "capacity": 5, "sequence": 16}
    assert user._line(taken[5]) == "*** 2 record(s) dropped here: the filter's buffer was full (MaxRecords) ***"


async def test_a_post_that_finds_the_buffer_filled_since_its_pre_drops_its_record(tmp_path: Path) -> None:
    """Three instances: all three pres find room for one more record, the bottom's post takes it."""
    async with minispy(tmp_path / "vol", MaxRecords="4") as (vol, reader):
        vol.stack.attach(inf_instance(vol, "middle"))
        vol.stack.attach(inf_instance(vol, "bottom"))
        for name in ("one", "two", "three"):
            with pytest.raises(FileNotFoundError):
                await vol.lookup(name)
        assert await reader.stats() == {"logged": 4, "dropped": 5, "buffered": 4, "capacity": 4, "sequence": 9}
        entries = await reader.log()
    assert [(e.get("seq"), e.get("instance")) for e in entries] == [
        (3, BOTTOM),
        (2, MIDDLE),
        (1, TOP),
        (6, BOTTOM),  # its post came first; the middle's (5) and the top's (4) found no room
        (None, None),
    ]
    assert entries[4] == {"type": "dropped", "count": 5, "time": entries[4]["time"]}


@pytest.mark.parametrize("parameters", [{"MaxRecords": "0"}, {"NameQueryMethod": "0x999"}])
async def test_parameters_that_make_no_sense_refuse_the_load(tmp_path: Path, parameters: dict[str, str]) -> None:
    with pytest.raises(StackError) as refused:
        InProcessVolume(tmp_path, ["minispy"], parameters={"minispy": parameters})
    assert refused.value.status == NtStatus.INVALID_PARAMETER


# -- the port -------------------------------------------------------------------------------------


async def test_get_log_waits_for_the_next_record_instead_of_answering_empty(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol") as (vol, reader):
        start = time.monotonic()
        assert (await reader.ask(protocol.get_log(200)))["entries"] == []
        assert time.monotonic() - start >= 0.2

        answers: list[dict[str, Any]] = []

        async def wait_for_log() -> None:
            answers.append(await reader.ask(protocol.get_log(protocol.MAX_WAIT_MS)))

        async with trio.open_nursery() as nursery:
            start = time.monotonic()
            nursery.start_soon(wait_for_log)
            await trio.sleep(0.3)  # the reader's request is waiting in the filter by now
            assert not answers
            with pytest.raises(FileNotFoundError):
                await vol.lookup("wake-up")
        took = time.monotonic() - start
    assert [e["name"].rsplit("/", 1)[1] for e in answers[0]["entries"]] == ["wake-up"]
    assert 0.3 <= took < 5


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"not json", "not JSON"),
        (b'{"v": 2, "op": "GET_LOG"}', "protocol version 2"),
        (b'{"v": 1, "op": "GET_EVERYTHING"}', "unknown op 'GET_EVERYTHING'"),
        (b'{"v": 1, "op": "GET_LOG", "wait_ms": -1}', "wait_ms -1"),
        (b'{"v": 1, "op": "GET_LOG", "wait_ms": 600000}', "wait_ms 600000"),
    ],
)
async def test_a_message_it_cannot_serve_gets_an_error_answer(tmp_path: Path, message: bytes, error: str) -> None:
    async with minispy(tmp_path / "vol") as (_vol, reader):
        with pytest.raises(protocol.ProtocolError, match=error):
            await reader.ask(message)
        assert (await reader.stats())["logged"] == 0  # the connection goes on


async def test_a_reply_capacity_too_small_for_one_entry_is_an_error_and_loses_nothing(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol") as (vol, reader):
        with pytest.raises(FileNotFoundError):
            await vol.lookup("x")
        with pytest.raises(protocol.ProtocolError, match="too small for the next entry"):
            await reader.ask(protocol.get_log(0), capacity=100)
        assert [r["major"] for r in await reader.records()] == ["LOOKUP"]


async def test_one_reader_at_a_time_and_the_next_once_it_left(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol") as (vol, reader):
        with pytest.raises(PortRefusedError) as refused:
            await Reader.connect(vol)
        assert refused.value.status == NtStatus.CONNECTION_COUNT_LIMIT
        await reader.close()
        with trio.fail_after(5):
            while True:  # the filter hears of the disconnection at once, in its own task
                try:
                    second = await Reader.connect(vol)
                    break
                except PortRefusedError:
                    await trio.sleep(0.01)
        assert (await second.stats())["capacity"] == 10_000
        await second.close()


async def test_unloading_closes_the_port_and_disconnects_a_waiting_reader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The port goes with the filter (its socket too, and no "filter bug" logged); the reader's wait ends.

    The filter is unloaded as fltmc unload does it: its unload callback first, its instances detached after.
    """
    caplog.set_level(logging.INFO, logger="fltfuse")
    async with minispy(tmp_path / "vol") as (vol, reader):
        port = Path(vol.port_path(protocol.PORT_NAME))
        assert port.is_socket()
        failures: list[BaseException] = []

        async def wait_for_log() -> None:
            try:
                await reader.ask(protocol.get_log(protocol.MAX_WAIT_MS))
            except PortDisconnectedError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_log)
            await trio.sleep(0.2)
            assert spy_filter(vol).unload() == NtStatus.SUCCESS
        assert len(failures) == 1
        assert not port.exists()
    assert "filter bug" not in caplog.text
    assert "port MiniSpyPort closed" in caplog.text


async def test_two_volumes_in_one_process_have_their_own_logs(tmp_path: Path) -> None:
    async with minispy(tmp_path / "one") as (one, reader_one), minispy(tmp_path / "two") as (two, reader_two):
        assert spy_filter(one).data is not spy_filter(two).data
        with pytest.raises(FileNotFoundError):
            await one.lookup("only-on-one")
        assert [r["name"] for r in await reader_one.records()] == [f"{one.directory.absolute()}/only-on-one"]
        assert await reader_two.records() == []


# -- the minispy command against an in-process port ----------------------------------------------


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``minispy ARGV``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = user.main(argv)
    return code, out.getvalue(), err.getvalue()


async def run_minispy(vol: InProcessVolume, *argv: str) -> tuple[int, str, str]:
    """``minispy --port PATH ARGV`` in a thread (the loop goes on serving the port meanwhile)."""
    return await trio.to_thread.run_sync(run_main, ["--port", vol.port_path(protocol.PORT_NAME), *argv])


async def test_the_command_streams_json_lines_that_pass_its_filters(tmp_path: Path) -> None:
    directory = tmp_path / "vol"
    directory.mkdir()
    async with InProcessVolume(directory, ["minispy"]) as vol:
        await vol.mkdir("d")
        await vol.write_file("d/a.txt", b"a")
        await vol.write_file("d/b.log", b"b")
        await vol.read_file("d/a.txt")
        code, out, err = await run_minispy(vol, "--json", "--path", "*/d/*.txt", "--op", "create,READ", "--count", "3")
        assert (code, err) == (0, "")
        records = [json.loads(line) for line in out.splitlines()]
        assert [(r["major"], r["name"].rsplit("/", 2)[1:]) for r in records] == [
            ("CREATE", ["d", "a.txt"]),
            ("CREATE", ["d", "a.txt"]),
            ("READ", ["d", "a.txt"]),
        ]
        assert [r["arguments"].get("disposition") for r in records] == ["OVERWRITE_IF", "OPEN", None]

        await vol.read_file("d/b.log")  # what was logged before went to the first reader: these are new
        code, out, _ = await run_minispy(
            vol, "--json", "--pid", str(ME), "--process", "py*", "--path", "b.lo", "--count", "1"
        )
        assert code == 0
        assert [json.loads(line)["major"] for line in out.splitlines()] == ["LOOKUP"]


async def test_the_command_prints_an_aligned_table_and_stats(tmp_path: Path) -> None:
    directory = tmp_path / "vol"
    directory.mkdir()
    async with InProcessVolume(directory, ["minispy"]) as vol:
        await vol.write_file("t.txt", b"12345")
        code, out, _ = await run_minispy(vol, "--count", "5")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split() == [
            "SEQ",
            "INST",
            "TIME",
            "USEC",
            "PID",
            "PROCESS",
            "OPERATION",
            "STATUS",
            "NAME",
            "ARGUMENTS",
        ]
        assert [row.split()[6] for row in rows] == ["LOOKUP", "CREATE", "WRITE", "CLEANUP", "CLOSE"]
        assert [row.split()[7] for row in rows] == ["ENOENT", "SUCCESS", "SUCCESS", "SUCCESS", "SUCCESS"]
        name_column = header.index("NAME")
        assert all(row[name_column:].startswith(f"{directory.absolute()}/t.txt") for row in rows)
        assert rows[2].endswith("offset=0 length=5 information=5")
        assert {row.split()[1] for row in rows} == {"Top"}

        code, out, _ = await run_minispy(vol, "--stats")
        assert (code, out) == (0, "logged 5, dropped 0, buffered 0 of 10000, last sequence number 5\n")


async def test_the_command_says_why_it_cannot_connect(tmp_path: Path) -> None:
    async with minispy(tmp_path / "vol") as (vol, _reader):
        code, _, err = await run_minispy(vol, "--stats")
        assert code == 1
        assert "another minispy is already connected to" in err and "one reader at a time" in err
    code, _, err = run_main(["--port", str(tmp_path / "nowhere"), "--stats"])
    assert code == 1 and "no port" in err and "is the minispy filter loaded?" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--op", "READX"], "unknown major function(s) READX"),
        (["--count", "0"], "--count takes a positive number"),
        (["--attach", "/mnt", "--detach", "/mnt"], "not allowed with argument"),
        (["--instance", "middle"], "--instance goes with --attach or --detach"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        user.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_inf_has_three_instances_and_only_the_top_one_attaches_by_itself() -> None:
    inf = _loader.find_inf("minispy")
    assert [(s.name, s.altitude, s.flags) for s in inf.instances] == [
        ("Minispy - Top Instance", Decimal(385100), 0),
        ("Minispy - Middle Instance", Decimal(370000), 1),
        ("Minispy - Bottom Instance", Decimal(361000), 1),
    ]
    assert (inf.class_name, inf.load_order_group, inf.default_instance) == (
        "ActivityMonitor",
        "FSFilter Activity Monitor",
        "Minispy - Top Instance",
    )
    assert list(protocol.INSTANCES.values()) == [s.name for s in inf.instances]
