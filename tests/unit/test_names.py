"""File names in-process (``fltfuse._stack.names``): formats and parsed parts, hard links, query methods,
the name cache's invalidation, what each request names, name providers, and deleted files.

The names are asked for by :class:`Recorder`, a test filter that queries in its own callbacks (as a
minifilter does) or from the test (``get_file_name_information_unsafe``, as a work item would).
The volume's name is the directory the InProcessVolume serves.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from fltfuse import (
    CallbackData,
    CreateParameters,
    DispositionParameters,
    FileNameError,
    FileNameInformation,
    FileObject,
    FileSystemControlParameters,
    Filter,
    FilterRegistration,
    Instance,
    LinkParameters,
    LookupParameters,
    MajorFunction,
    NameFormat,
    NameQuery,
    NtStatus,
    OperationRegistration,
    Parameters,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    QueryInformationParameters,
    ReadParameters,
    RelatedObjects,
    RenameParameters,
    Requestor,
    get_destination_file_name_information,
    get_file_name_information,
    get_file_name_information_unsafe,
    purge_name_cache,
)
from fltfuse.testing import InProcessVolume

NORMALIZED, OPENED, SHORT = NameFormat.NORMALIZED, NameFormat.OPENED, NameFormat.SHORT
DEFAULT, CACHE_ONLY, FILESYSTEM_ONLY = NameQuery.DEFAULT, NameQuery.CACHE_ONLY, NameQuery.FILESYSTEM_ONLY
QUERIES = (DEFAULT, CACHE_ONLY, FILESYSTEM_ONLY)
NAMED_MAJORS = (
    MajorFunction.LOOKUP,
    MajorFunction.CREATE,
    MajorFunction.SET_INFORMATION,
    MajorFunction.QUERY_INFORMATION,
    MajorFunction.FILE_SYSTEM_CONTROL,
    MajorFunction.READ,
)

Answer = FileNameInformation | NtStatus  # a name, or the status of the FileNameError the query raised


class Seen(NamedTuple):
    """One name a recorder asked for in a callback: ``what`` is a NameFormat, or "destination"."""

    when: str  # "pre" or "post"
    kind: type[Parameters]
    what: NameFormat | str
    answer: Answer


def answer(ask: Callable[..., FileNameInformation], *args: Any) -> Answer:
    """``ask(*args)``, or the status of the FileNameError it raised."""
    try:
        return ask(*args)
    except FileNameError as exc:
        return exc.status


def name(value: Answer) -> str | NtStatus:
    """The full name of an answer (or its status), for short asserts."""
    return value.name if isinstance(value, FileNameInformation) else value


class Recorder:
    """A test filter that asks for the names of every request of ``majors`` it sees, and records the answers.

    In each pre- and post-operation it asks, with ``query``, for each of ``formats`` and (in a
    pre-operation) for the destination name. ``handles`` keeps the FileObject of each handle its
    post-CREATE saw, for the test's own queries. ``registration`` adds name provider callbacks.
    """

    def __init__(
        self,
        name: str = "recorder",
        altitude: int = 370000,
        *,
        majors: tuple[MajorFunction, ...] = NAMED_MAJORS,
        formats: tuple[NameFormat, ...] = (NORMALIZED, OPENED),
        query: NameQuery = DEFAULT,
        **registration: Any,
    ):
        self.formats = formats
        self.query = query
        self.seen: list[Seen] = []
        self.handles: dict[int, FileObject] = {}
        operations = tuple(OperationRegistration(major, self.pre, self.post) for major in majors)
        filter_ = Filter(name, FilterRegistration(operations=operations, **registration))
        self.instance = Instance(filter_, f"{name} instance", Decimal(altitude))

    def pre(self, cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
        self.record("pre", cbd, objects)
        for name_format in self.formats:
            destination = answer(get_destination_file_name_information, cbd, objects, name_format)
            self.seen.append(Seen("pre", type(cbd.iopb.parameters), "destination", destination))
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    def post(
        self, cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
    ) -> PostopCallbackStatus:
        self.record("post", cbd, objects)
        params = cbd.iopb.parameters
        if isinstance(params, CreateParameters) and params.handle is not None:
            self.handles[params.handle] = cbd.iopb.target_file_object
        return PostopCallbackStatus.FINISHED_PROCESSING

    def record(self, when: str, cbd: CallbackData, objects: RelatedObjects) -> None:
        for name_format in self.formats:
            got = answer(get_file_name_information, cbd, objects, name_format, self.query)
            self.seen.append(Seen(when, type(cbd.iopb.parameters), name_format, got))

    def answers(self, kind: type[Parameters], what: NameFormat | str = NORMALIZED, when: str = "pre") -> list[Answer]:
        """What the callbacks got, in order, for requests of ``kind``."""
        return [s.answer for s in self.seen if s.kind is kind and s.what == what and s.when == when]

    def names(self, kind: type[Parameters], what: NameFormat | str = NORMALIZED, when: str = "pre") -> list[Any]:
        return [name(a) for a in self.answers(kind, what, when)]

    def objects(self, file_object: FileObject | None = None) -> RelatedObjects:
        return RelatedObjects(self.instance.filter, self.instance, self.instance.volume, file_object)

    def ask(self, file_object: FileObject, name_format: NameFormat = NORMALIZED, query: NameQuery = DEFAULT) -> Answer:
        """The name of ``file_object`` asked outside a request (FltGetFileNameInformationUnsafe)."""
        return answer(get_file_name_information_unsafe, self.objects(file_object), file_object, name_format, query)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The directory the volume serves; its path is the volume's name."""
    path = tmp_path / "vol"
    path.mkdir()
    return path


@pytest.fixture
async def open_volume(root: Path) -> AsyncIterator[Callable[..., InProcessVolume]]:
    """Volumes of ``root`` with the given recorders attached; closed (contexts checked) after the test."""
    made: list[InProcessVolume] = []

    def make(*recorders: Recorder) -> InProcessVolume:
        vol = InProcessVolume(root, [r.instance for r in recorders])
        made.append(vol)
        return vol

    yield make
    for vol in made:
        await vol.aclose()


def put(root: Path, files: dict[str, bytes]) -> None:
    """Make ``files`` (and their directories) in the backing directory."""
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def info(root: Path, path: str, name_format: NameFormat = NORMALIZED) -> FileNameInformation:
    """The parsed name of file or directory ``path`` (from the volume root) on the volume of ``root``."""
    volume = str(root)
    parent, _, final = ("/" + path).rpartition("/")
    dot = final.rfind(".")
    return FileNameInformation(
        volume + "/" + path, name_format, volume, parent + "/", final, final[dot + 1 :] if dot > 0 else ""
    )


async def dispatch(vol: InProcessVolume, file_object: FileObject, params: Parameters) -> CallbackData:
    """Send one request down the volume's stack as the kernel adapter would (for requests it has no call for)."""
    cbd = CallbackData(file_object, params, Requestor(os.getpid(), os.geteuid(), os.getegid(), 0o022))
    await vol.stack.dispatch(cbd)
    return cbd


# -- 1. formats and parsed parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parent_dir", "final", "extension"),
    [
        ("main.c", "/", "main.c", "c"),
        ("src/main.c", "/src/", "main.c", "c"),
        ("src/lib/archive.tar.gz", "/src/lib/", "archive.tar.gz", "gz"),
        ("home/.bashrc", "/home/", ".bashrc", ""),  # a dot at position 0 starts no extension
        ("home/.hidden.txt", "/home/", ".hidden.txt", "txt"),
        ("src/Makefile", "/src/", "Makefile", ""),
        ("src/trailing.", "/src/", "trailing.", ""),
        ("with space/a b.txt", "/with space/", "a b.txt", "txt"),
    ],
)
async def test_a_file_has_its_full_name_and_parts_in_both_formats(
    root: Path, open_volume: Callable[..., InProcessVolume], path: str, parent_dir: str, final: str, extension: str
) -> None:
    put(root, {path: b"data"})
    recorder = Recorder()
    vol = open_volume(recorder)
    assert await vol.read_file(path) == b"data"
    volume = str(root)
    for name_format in (NORMALIZED, OPENED):
        expected = FileNameInformation(volume + "/" + path, name_format, volume, parent_dir, final, extension, "", "")
        assert expected.name == expected.volume + expected.parent_dir + expected.final_component
        # post-CREATE of the open, and pre-READ through the handle
        assert recorder.answers(CreateParameters, name_format, "post") == [expected]
        assert recorder.answers(ReadParameters, name_format)[0] == expected


async def test_directories_and_the_root_are_named_without_a_trailing_slash(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"src/pkg.d/x": b"", "top.txt": b""})
    recorder = Recorder()
    vol = open_volume(recorder)
    await vol.listdir("src/pkg.d")
    await vol.listdir("")
    for name_format in (NORMALIZED, OPENED):
        assert recorder.answers(CreateParameters, name_format, "post") == [
            FileNameInformation(f"{root}/src/pkg.d", name_format, str(root), "/src/", "pkg.d", "d"),
            FileNameInformation(str(root), name_format, str(root), "", "", ""),  # the root: the volume's name
        ]
    # The root as the parent in a LOOKUP: one slash, not two.
    assert recorder.names(LookupParameters)[0] == f"{root}/src"


async def test_a_symlink_as_the_final_component_is_named_not_followed(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"src/main.c": b"int main;", "src/sub/x": b""})
    (root / "src" / "link.c").symlink_to("main.c")
    (root / "src" / "dirlink").symlink_to("sub")
    (root / "dangling").symlink_to("nowhere/at/all")
    recorder = Recorder()
    vol = open_volume(recorder)
    for path in ("src/link.c", "src/dirlink", "dangling"):
        await vol.stat(path)  # LOOKUP, then QUERY_INFORMATION of the symlink itself (lstat)
        target = await dispatch(vol, FileObject(await vol.lookup(path)), FileSystemControlParameters())  # readlink
        assert target.io_status.status == NtStatus.SUCCESS
        assert recorder.answers(QueryInformationParameters)[-1] == info(root, path)
        assert recorder.answers(FileSystemControlParameters)[-1] == info(root, path)
        assert recorder.answers(FileSystemControlParameters, OPENED)[-1] == info(root, path, OPENED)
        assert recorder.answers(LookupParameters, when="post")[-1] == info(root, path)


async def test_names_that_are_not_utf8_come_as_fsdecode_gives_them(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    raw_dir, raw_file = b"d\xff\xfe", b"caf\xe9.txt"
    os.makedirs(os.fsencode(root) + b"/" + raw_dir)
    with open(os.fsencode(root) + b"/" + raw_dir + b"/" + raw_file, "wb") as f:
        f.write(b"latin-1")
    recorder = Recorder()
    vol = open_volume(recorder)
    path = os.fsdecode(raw_dir + b"/" + raw_file)
    assert await vol.read_file(path) == b"latin-1"
    (got,) = recorder.answers(CreateParameters, NORMALIZED, "post")
    assert got == FileNameInformation(
        f"{root}/d\udcff\udcfe/caf\udce9.txt", NORMALIZED, str(root), "/d\udcff\udcfe/", "caf\udce9.txt", "txt"
    )
    assert os.fsencode(got.name) == os.fsencode(root) + b"/" + raw_dir + b"/" + raw_file
    assert recorder.answers(CreateParameters, OPENED, "post") == [info(root, path, OPENED)]


# -- 2. hard links ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed", ["a/x", "b/y"])
async def test_a_hard_link_is_opened_by_its_link_and_a_removed_link_is_never_named(
    root: Path, open_volume: Callable[..., InProcessVolume], removed: str
) -> None:
    put(root, {"a/x": b"linked", "b/.keep": b""})
    os.link(root / "a" / "x", root / "b" / "y")
    links = {f"{root}/a/x", f"{root}/b/y"}
    recorder = Recorder()
    vol = open_volume(recorder)
    via_a = await vol.open("a/x")
    via_b = await vol.open("b/y")
    opened = recorder.names(CreateParameters, OPENED, "post")
    assert opened == [f"{root}/a/x", f"{root}/b/y"]  # each open is named by the link it came through
    for normalized in recorder.names(CreateParameters, NORMALIZED, "post"):
        assert normalized in links  # a link that names the file
    file_a, file_b = recorder.handles[via_a], recorder.handles[via_b]
    for query in (DEFAULT, FILESYSTEM_ONLY):
        assert name(recorder.ask(file_a, OPENED, query)) == f"{root}/a/x"
        assert name(recorder.ask(file_b, OPENED, query)) == f"{root}/b/y"
        assert name(recorder.ask(file_b, NORMALIZED, query)) in links

    await vol.unlink(removed)
    (kept,) = links - {f"{root}/{removed}"}
    for file_object in (file_a, file_b):
        for name_format in (NORMALIZED, OPENED):
            assert name(recorder.ask(file_object, name_format, DEFAULT)) == kept
            assert name(recorder.ask(file_object, name_format, FILESYSTEM_ONLY)) == kept
            assert name(recorder.ask(file_object, name_format, CACHE_ONLY)) in (kept, NtStatus.FLT_NAME_CACHE_MISS)
    # READs through either handle, and a new open of the kept link: the removed link is never named.
    mark = len(recorder.seen)
    for handle in (via_a, via_b):
        assert await vol.read(handle, 0, 100) == b"linked"
        await vol.close_handle(handle)
    assert await vol.read_file(kept.removeprefix(f"{root}/")) == b"linked"
    after = recorder.seen[mark:]
    assert f"{root}/{removed}" not in {name(s.answer) for s in after}
    assert {name(s.answer) for s in after if s.kind is ReadParameters and s.what != "destination"} == {kept}


# -- 3. SHORT ---------------------------------------------------------------------------------------------


async def test_short_names_do_not_exist(root: Path, open_volume: Callable[..., InProcessVolume]) -> None:
    put(root, {"LongFileName.text": b""})
    recorder = Recorder(formats=(SHORT,))
    vol = open_volume(recorder)
    await vol.read_file("LongFileName.text")
    await vol.rename("LongFileName.text", "Other.text")
    asked = [s for s in recorder.seen if s.what is SHORT or s.kind is RenameParameters]
    assert {s.kind for s in asked} == {LookupParameters, CreateParameters, ReadParameters, RenameParameters}
    assert {s.answer for s in asked} == {NtStatus.NOT_SUPPORTED}
    assert recorder.answers(RenameParameters, "destination") == [NtStatus.NOT_SUPPORTED]
    assert recorder.ask(FileObject(await vol.lookup("Other.text")), SHORT) == NtStatus.NOT_SUPPORTED


# -- 4. query methods -------------------------------------------------------------------------------------


async def test_cache_only_misses_until_a_default_query_fills_the_cache(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"d/f.txt": b"", "d/g.txt": b""})
    quiet = Recorder(majors=())  # asks nothing by itself: the cache holds only what the test asks
    vol = open_volume(quiet)
    file_object = FileObject(await vol.lookup("d/f.txt"))
    linked = FileObject(file_object.inode)
    linked.link = (await vol.lookup("d"), b"f.txt")  # as opened through d/f.txt
    for fo, name_format in ((file_object, NORMALIZED), (linked, OPENED)):
        assert quiet.ask(fo, name_format, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
        assert quiet.ask(fo, name_format, DEFAULT) == info(root, "d/f.txt", name_format)
        hits = vol.stack.names.hits
        assert quiet.ask(fo, name_format, CACHE_ONLY) == info(root, "d/f.txt", name_format)
        assert vol.stack.names.hits == hits + 1
    # Another file's name was never asked for: still a miss.
    assert quiet.ask(FileObject(await vol.lookup("d/g.txt")), NORMALIZED, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS


async def test_filesystem_only_sees_a_directory_renamed_behind_the_volumes_back(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"d/sub/f.txt": b""})
    quiet = Recorder(majors=())
    vol = open_volume(quiet)
    file_object = FileObject(await vol.lookup("d/sub/f.txt"))
    directory = FileObject(await vol.lookup("d/sub"))
    assert name(quiet.ask(file_object)) == f"{root}/d/sub/f.txt"
    assert name(quiet.ask(directory)) == f"{root}/d/sub"
    os.rename(root / "d", root / "e")  # on the backing directory: the volume does not see it
    # DEFAULT may answer from the cache, which changes behind the volume's back do not reach:
    # here it still says d/sub. FILESYSTEM_ONLY asks the file system, and refreshes the cache.
    assert name(quiet.ask(file_object, NORMALIZED, DEFAULT)) == f"{root}/d/sub/f.txt"
    assert name(quiet.ask(file_object, NORMALIZED, FILESYSTEM_ONLY)) == f"{root}/e/sub/f.txt"
    assert name(quiet.ask(directory, NORMALIZED, FILESYSTEM_ONLY)) == f"{root}/e/sub"
    assert name(quiet.ask(file_object, NORMALIZED, CACHE_ONLY)) == f"{root}/e/sub/f.txt"
    assert name(quiet.ask(directory, NORMALIZED, DEFAULT)) == f"{root}/e/sub"


async def test_filesystem_only_sees_a_file_renamed_behind_the_volumes_back(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"d/old.txt": b"moved"})
    quiet = Recorder(majors=())
    vol = open_volume(quiet)
    file_object = FileObject(await vol.lookup("d/old.txt"))
    assert name(quiet.ask(file_object)) == f"{root}/d/old.txt"
    os.rename(root / "d" / "old.txt", root / "d" / "new.txt")
    assert name(quiet.ask(file_object, NORMALIZED, DEFAULT)) == f"{root}/d/old.txt"  # the cached name, as above
    assert name(quiet.ask(file_object, NORMALIZED, FILESYSTEM_ONLY)) == f"{root}/d/new.txt"
    assert name(quiet.ask(file_object, NORMALIZED, DEFAULT)) == f"{root}/d/new.txt"


# -- 5. invalidation --------------------------------------------------------------------------------------


def never(recorder: Recorder, file_object: FileObject, old: str, new: str) -> None:
    """Every query method and format answers ``new`` for ``file_object``, or (CACHE_ONLY) misses; never ``old``."""
    for name_format in (NORMALIZED, OPENED):
        for query in QUERIES:
            got = name(recorder.ask(file_object, name_format, query))
            allowed = (new, NtStatus.FLT_NAME_CACHE_MISS) if query is CACHE_ONLY else (new,)
            assert got in allowed, f"{name_format.name} {query.name}: {got!r}, not {new!r} (old: {old!r})"


async def test_a_renamed_file_is_never_named_by_its_old_name(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"a/b": b"file", "c/.keep": b""})
    recorder = Recorder()
    vol = open_volume(recorder)
    handle = await vol.open("a/b")  # names cached: the file, and its opened name through a/b
    file_object = recorder.handles[handle]
    for query in QUERIES:
        assert name(recorder.ask(file_object, OPENED, query)) == f"{root}/a/b"
    await vol.rename("a/b", "c/d")
    never(recorder, file_object, f"{root}/a/b", f"{root}/c/d")
    never(recorder, FileObject(file_object.inode), f"{root}/a/b", f"{root}/c/d")
    assert await vol.read(handle, 0, 10) == b"file"
    await vol.close_handle(handle)
    assert await vol.read_file("c/d") == b"file"
    assert recorder.names(ReadParameters)[-1] == f"{root}/c/d"
    assert recorder.names(CreateParameters, OPENED, "post")[-1] == f"{root}/c/d"


async def test_a_file_under_a_renamed_directory_is_never_named_by_the_old_path(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"p/q/r.txt": b"deep", "elsewhere/s.txt": b""})
    recorder = Recorder()
    vol = open_volume(recorder)
    assert await vol.read_file("p/q/r.txt") == b"deep"
    assert await vol.read_file("elsewhere/s.txt") == b""
    r, q = FileObject(await vol.lookup("p/q/r.txt")), FileObject(await vol.lookup("p/q"))
    other = FileObject(await vol.lookup("elsewhere/s.txt"))
    for file_object, path in ((r, "p/q/r.txt"), (q, "p/q"), (other, "elsewhere/s.txt")):
        assert name(recorder.ask(file_object, NORMALIZED, CACHE_ONLY)) == f"{root}/{path}"
    await vol.rename("p", "t")
    never(recorder, r, f"{root}/p/q/r.txt", f"{root}/t/q/r.txt")
    never(recorder, q, f"{root}/p/q", f"{root}/t/q")
    # A name outside the renamed directory stays cached.
    assert name(recorder.ask(other, NORMALIZED, CACHE_ONLY)) == f"{root}/elsewhere/s.txt"
    assert await vol.read_file("t/q/r.txt") == b"deep"
    assert recorder.names(CreateParameters, OPENED, "post")[-1] == f"{root}/t/q/r.txt"


async def test_an_exchange_swaps_the_names_and_a_replaced_target_loses_its_name(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"x": b"X", "y": b"Y", "replaced": b"R"})
    recorder = Recorder()
    vol = open_volume(recorder)
    x, y = FileObject(await vol.lookup("x")), FileObject(await vol.lookup("y"))
    replaced = await vol.open("replaced")
    for file_object in (x, y, recorder.handles[replaced]):
        assert isinstance(recorder.ask(file_object), FileNameInformation)  # cached
    await vol.rename("x", "y", 2)  # RENAME_EXCHANGE
    never(recorder, x, f"{root}/x", f"{root}/y")
    never(recorder, y, f"{root}/y", f"{root}/x")
    await vol.rename("x", "replaced")  # the old y replaces the open file
    assert recorder.ask(recorder.handles[replaced], NORMALIZED, DEFAULT) == NtStatus.FILE_DELETED
    assert recorder.ask(recorder.handles[replaced], NORMALIZED, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
    never(recorder, y, f"{root}/x", f"{root}/replaced")
    await vol.close_handle(replaced)


async def test_unlink_rmdir_and_forget_drop_the_cached_names(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"d/gone.txt": b"", "d/empty/.keep": b"", "d/forgotten.txt": b"", "d/kept.txt": b""})
    os.unlink(root / "d" / "empty" / ".keep")
    quiet = Recorder(majors=())
    vol = open_volume(quiet)
    objects = {
        path: FileObject(await vol.lookup(f"d/{path}")) for path in ("gone.txt", "empty", "forgotten.txt", "kept.txt")
    }
    for path, file_object in objects.items():
        assert name(quiet.ask(file_object)) == f"{root}/d/{path}"
        assert name(quiet.ask(file_object, NORMALIZED, CACHE_ONLY)) == f"{root}/d/{path}"
    await vol.unlink("d/gone.txt")
    await vol.rmdir("d/empty")
    for path in ("gone.txt", "empty"):
        assert quiet.ask(objects[path], NORMALIZED, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
        assert quiet.ask(objects[path], NORMALIZED, DEFAULT) == NtStatus.FILE_DELETED  # still known, no name left
    # The kernel forgets an inode (its number may be reused): every cached name of it goes, and only those.
    forgotten = objects["forgotten.txt"].inode
    await vol.forget(forgotten)
    assert quiet.ask(objects["forgotten.txt"], NORMALIZED, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
    assert name(quiet.ask(objects["kept.txt"], NORMALIZED, CACHE_ONLY)) == f"{root}/d/kept.txt"


# -- 6. what a request names ------------------------------------------------------------------------------


async def test_requests_that_make_or_remove_a_name_name_parent_slash_name(
    root: Path, open_volume: Callable[..., InProcessVolume]
) -> None:
    put(root, {"d/old.txt": b"", "d/moved.txt": b"", "d/linked.txt": b"", "d/emptydir/.keep": b"", "e/.keep": b""})
    os.unlink(root / "d" / "emptydir" / ".keep")
    recorder = Recorder()
    vol = open_volume(recorder)
    with pytest.raises(FileNotFoundError):
        await vol.lookup("d/missing.txt")
    assert (
        recorder.names(LookupParameters)[-1]
        == recorder.names(LookupParameters, when="post")[-1]
        == (f"{root}/d/missing.txt")
    )

    await vol.write_file("d/new.txt", b"new")  # CREATE of a new file: pre and post name parent/name
    await vol.mkdir("d/newdir")
    assert recorder.names(CreateParameters) == [f"{root}/d/new.txt", f"{root}/d/newdir"]
    assert recorder.names(CreateParameters, OPENED) == [f"{root}/d/new.txt", f"{root}/d/newdir"]
    assert recorder.names(CreateParameters, when="post") == [f"{root}/d/new.txt", f"{root}/d/newdir"]

    await vol.unlink("d/old.txt")
    await vol.rmdir("d/emptydir")
    for when in ("pre", "post"):  # in the post the object is gone: the name is still parent/name
        assert recorder.names(DispositionParameters, when=when) == [f"{root}/d/old.txt", f"{root}/d/emptydir"]

    await vol.rename("d/moved.txt", "e/there.txt")
    assert recorder.names(RenameParameters) == [f"{root}/d/moved.txt"]
    assert recorder.answers(RenameParameters, "destination") == [
        info(root, "e/there.txt"),
        info(root, "e/there.txt", OPENED),
    ]

    linked = FileObject(await vol.lookup("d/linked.txt"))
    cbd = await dispatch(vol, linked, LinkParameters(await vol.lookup("e"), b"hard.txt"))
    assert cbd.io_status.status == NtStatus.SUCCESS
    assert os.path.samefile(root / "d" / "linked.txt", root / "e" / "hard.txt")
    assert recorder.names(LinkParameters) == [f"{root}/d/linked.txt"]  # the file the link is made to
    assert recorder.answers(LinkParameters, "destination") == [
        info(root, "e/hard.txt"),
        info(root, "e/hard.txt", OPENED),
    ]

    # Every other request has no destination.
    others = {
        s.answer for s in recorder.seen if s.what == "destination" and s.kind not in (RenameParameters, LinkParameters)
    }
    assert others == {NtStatus.INVALID_PARAMETER}
    assert {s.kind for s in recorder.seen if s.what == "destination"} >= {
        LookupParameters,
        CreateParameters,
        DispositionParameters,
    }


# -- 7. name providers ------------------------------------------------------------------------------------


class Mapper:
    """A name provider: what is ``/real...`` below it is ``/<virtual>...`` above it.

    ``bad`` is (callback name, answer): that callback answers that instead (a provider with a bug).
    """

    def __init__(self, virtual: str = "virtual"):
        self.virtual = virtual
        self.bad: tuple[str, Any] | None = None

    def generate_file_name(
        self, objects: RelatedObjects, file_object: FileObject, cbd: CallbackData | None, name_format: NameFormat
    ) -> Any:
        if self.bad is not None and self.bad[0] == "generate_file_name":
            return self.bad[1]
        below = get_file_name_information_unsafe(objects, file_object).name
        volume = objects.volume.mount_point if objects.volume is not None else ""
        real = volume + "/real"
        if below == real or below.startswith(real + "/"):
            return volume + "/" + self.virtual + below[len(real) :]
        return None

    def normalize_name_component(self, objects: RelatedObjects, parent_name: str, component: str) -> Any:
        if self.bad is not None and self.bad[0] == "normalize_name_component":
            return self.bad[1]
        volume = objects.volume.mount_point if objects.volume is not None else ""
        return self.virtual if parent_name == volume and component == "real" else component


@pytest.fixture
def provider_stack() -> tuple[Recorder, Recorder, Recorder, Mapper]:
    """Three recorders: the middle one provides names with a Mapper."""
    mapper = Mapper()
    above = Recorder("above", 380000)
    provider = Recorder(
        "provider",
        370000,
        generate_file_name=mapper.generate_file_name,
        normalize_name_component=mapper.normalize_name_component,
    )
    below = Recorder("below", 360000)
    return above, provider, below, mapper


async def test_a_name_provider_decides_the_names_above_it_only(
    root: Path, open_volume: Callable[..., InProcessVolume], provider_stack: tuple[Recorder, Recorder, Recorder, Mapper]
) -> None:
    above, provider, below, _ = provider_stack
    put(root, {"real/dir/f.txt": b"mapped", "other/g.txt": b"not mapped"})
    vol = open_volume(above, provider, below)
    assert await vol.read_file("real/dir/f.txt") == b"mapped"
    assert await vol.read_file("other/g.txt") == b"not mapped"
    stack = ((above, "virtual"), (provider, "real"), (below, "real"))
    for recorder, top in stack:
        lookups = [f"{root}/{top}", f"{root}/{top}/dir", f"{root}/{top}/dir/f.txt"]
        assert recorder.names(LookupParameters) == [*lookups, f"{root}/other", f"{root}/other/g.txt"]
        for name_format in (NORMALIZED, OPENED):
            assert recorder.answers(CreateParameters, name_format, "post") == [
                info(root, f"{top}/dir/f.txt", name_format),
                info(root, "other/g.txt", name_format),
            ], recorder.instance.name
    file_object = FileObject(await vol.lookup("real/dir/f.txt"))
    for recorder, top in stack:
        for query in QUERIES:
            assert recorder.ask(file_object, NORMALIZED, query) == info(root, f"{top}/dir/f.txt")
    # A destination above the provider is mapped too.
    await vol.rename("other/g.txt", "real/g.txt")
    assert above.names(RenameParameters, "destination") == 2 * [f"{root}/virtual/g.txt"]  # NORMALIZED, OPENED
    assert below.names(RenameParameters, "destination") == 2 * [f"{root}/real/g.txt"]


async def test_a_provider_that_changes_its_mapping_purges_the_cache(
    root: Path, open_volume: Callable[..., InProcessVolume], provider_stack: tuple[Recorder, Recorder, Recorder, Mapper]
) -> None:
    above, provider, below, mapper = provider_stack
    put(root, {"real/dir/f.txt": b"", "real/h.txt": b""})
    vol = open_volume(above, provider, below)
    f, h = FileObject(await vol.lookup("real/dir/f.txt")), FileObject(await vol.lookup("real/h.txt"))
    for file_object, path in ((f, "dir/f.txt"), (h, "h.txt")):
        assert name(above.ask(file_object)) == f"{root}/virtual/{path}"
    mapper.virtual = "other"
    # Until the provider purges, the cached names stay (as the provider said then).
    assert name(above.ask(f, NORMALIZED, DEFAULT)) == f"{root}/virtual/dir/f.txt"
    purge_name_cache(provider.objects(), f)  # one file: its names go, at every level
    assert above.ask(f, NORMALIZED, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
    assert name(above.ask(h, NORMALIZED, CACHE_ONLY)) == f"{root}/virtual/h.txt"
    assert name(above.ask(f)) == f"{root}/other/dir/f.txt"
    purge_name_cache(provider.objects())  # every file
    assert above.ask(h, NORMALIZED, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
    assert name(above.ask(h)) == f"{root}/other/h.txt"
    assert name(below.ask(h)) == f"{root}/real/h.txt"


@pytest.mark.parametrize("bad", [42, b"/real/bytes"])
@pytest.mark.parametrize("callback", ["generate_file_name", "normalize_name_component"])
async def test_a_provider_that_answers_something_not_a_str_is_an_error_naming_it(
    root: Path,
    open_volume: Callable[..., InProcessVolume],
    provider_stack: tuple[Recorder, Recorder, Recorder, Mapper],
    callback: str,
    bad: Any,
) -> None:
    above, provider, below, mapper = provider_stack
    put(root, {"real/f.txt": b"still served"})
    vol = open_volume(above, provider, below)
    mapper.bad = (callback, bad)
    assert await vol.read_file("real/f.txt") == b"still served"  # the requests go on
    # Each name above the provider that needs the bad callback: a LOOKUP's (a component), an open's (a file).
    failed = LookupParameters if callback == "normalize_name_component" else CreateParameters
    when = "pre" if failed is LookupParameters else "post"
    assert set(above.names(failed, when=when)) == {NtStatus.FLT_INTERNAL_ERROR}
    rename = CallbackData(FileObject(1), RenameParameters(1, b"x", 1, b"y"), Requestor(os.getpid(), 0, 0, 0o022))
    file_object = FileObject(await vol.lookup("real/f.txt"))
    with pytest.raises(FileNameError) as raised:
        if callback == "generate_file_name":
            get_file_name_information_unsafe(above.objects(file_object), file_object)
        else:
            get_destination_file_name_information(rename, above.objects())
    assert raised.value.status == NtStatus.FLT_INTERNAL_ERROR
    assert f"filter provider: {callback} returned {bad!r}, not a str" in str(raised.value)
    # The instances at and below the provider are not affected.
    for recorder in (provider, below):
        assert recorder.names(CreateParameters, when="post") == [f"{root}/real/f.txt"]
        assert recorder.names(LookupParameters)[:2] == [f"{root}/real", f"{root}/real/f.txt"]


# -- 8. deleted but open ----------------------------------------------------------------------------------


async def test_a_deleted_file_still_open_has_no_name(root: Path, open_volume: Callable[..., InProcessVolume]) -> None:
    put(root, {"d/doomed.txt": b"still readable"})
    recorder = Recorder()
    vol = open_volume(recorder)
    handle = await vol.open("d/doomed.txt")
    file_object = recorder.handles[handle]
    assert name(recorder.ask(file_object)) == f"{root}/d/doomed.txt"
    await vol.unlink("d/doomed.txt")
    for name_format in (NORMALIZED, OPENED):
        assert recorder.ask(file_object, name_format, DEFAULT) == NtStatus.FILE_DELETED
        assert recorder.ask(file_object, name_format, FILESYSTEM_ONLY) == NtStatus.FILE_DELETED
        assert recorder.ask(file_object, name_format, CACHE_ONLY) == NtStatus.FLT_NAME_CACHE_MISS
    assert await vol.read(handle, 0, 100) == b"still readable"
    assert set(recorder.names(ReadParameters)) == {NtStatus.FILE_DELETED}
    assert set(recorder.names(ReadParameters, OPENED)) == {NtStatus.FILE_DELETED}
    await vol.close_handle(handle)


def test_parse_refuses_a_name_off_the_volume_or_with_a_trailing_slash() -> None:
    for bad in ("/elsewhere/f", "/vol/d/", "/volume/f"):
        with pytest.raises(FileNameError) as raised:
            FileNameInformation.parse(bad, "/vol", NORMALIZED)
        assert raised.value.status == NtStatus.OBJECT_NAME_INVALID
    assert FileNameInformation.parse("/vol", "/vol", OPENED) == FileNameInformation("/vol", OPENED, "/vol", "", "", "")


def test_the_name_cache_indexes_stay_consistent_through_invalidation_purge_and_eviction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fltfuse._stack.names import NameCache

    cache = NameCache()
    monkeypatch.setattr(NameCache, "SIZE", 3)

    def info(path: str) -> FileNameInformation:
        return FileNameInformation.parse("/v" + path, "/v", NameFormat.NORMALIZED)

    cache.put((None, 10, None), b"/a/b/c", info("/a/b/c"))
    cache.put((None, 11, None), b"/a/x", info("/a/x"))
    cache.put(("provider", 10, None), b"/a/b/c", info("/z/b/c"))
    cache.invalidate_path(b"/a/b/c")  # the file: both levels go, the sibling stays
    assert len(cache) == 1 and cache.get((None, 11, None)) == info("/a/x")
    cache.put((None, 12, None), b"/a/b/d", info("/a/b/d"))
    cache.invalidate_path(b"/a/b")  # a directory above: what is below it goes
    assert len(cache) == 1 and cache.get((None, 12, None)) is None
    for ino in (20, 21, 22, 23):  # one more than fits: the least recently used goes, indexes too
        cache.put((None, ino, None), b"/q/%d" % ino, info(f"/q/{ino}"))
    assert len(cache) == 3 and cache.get((None, 11, None)) is None and cache.get((None, 20, None)) is None
    cache.purge(22)
    assert len(cache) == 2 and cache.get((None, 22, None)) is None
    cache.invalidate_path(b"/q")
    assert len(cache) == 0
    cache.put((None, 30, None), b"/q/30", info("/q/30"))
    cache.invalidate_path(b"/q/3")  # a path that is only a prefix of a name is not above it
    assert len(cache) == 1
