#!/usr/bin/env python3
"""Benchmark fltfuse against raw ext4 and its peers, side by side in one run.

    sudo scripts/bench.py [--targets raw,fltfuse,fltfuse-1f,...] [--rounds 3] [--quick]
                          [--out FILE.md] [--json FILE.json]

Setup: a sparse ext4 image in a fresh temporary directory, attached with
``losetup --find --show --direct-io=on`` and mounted at <tmp>/ext4. The raw
target works in <tmp>/ext4/src; every FUSE target mirrors that directory at its
own mount point, so all targets hit the same ext4 and the same device.

Each round runs every workload on every target, one after the other
(interleaved), and rotates the order of the targets from one workload and round
to the next, so that none always goes first. Every (workload, target) pair gets
a fresh FUSE mount and starts with sync + drop_caches. Workloads:

  seq        fio, bs=1M, psync: sequential write without fsync, the same with
             end_fsync=1, then (after drop_caches) a cold sequential read    MB/s
  randread   fio 4 KiB random read, psync, QD1, each block of a file laid out
             once on raw ext4 read at most once, capped at --rand-runtime;
             readahead on the loop device is off during it (a FUSE daemon's
             own backing descriptor does not get fio's FADV_RANDOM hint, so it
             would otherwise be served by ext4 readahead that raw is not)   IOPS
  randwrite  fio 4 KiB random write over the same file, psync, QD1,
             end_fsync=1, capped at --rand-runtime                          IOPS
  meta       a child Python process makes N files of 1 KiB in one directory:
             create, stat all, read all, unlink all                       ops/s
  tools      tar -xf of a tarball of the Python standard library (made once,
             outside the mount, *-packages excluded), du -s, grep -r import,
             rm -rf                                                      seconds

The table shows, per workload, the median [min-max] over the rounds for each
target, and per FUSE target the ratio of its median to raw's median as "speed
relative to raw": target/raw for rates, raw/target for seconds (1.0 = as fast
as raw ext4, 0.25 = four times slower).

Filter stacks: fltfuse-1f mounts with one passthrough instance, fltfuse-5f with
five (one --filter, four `fltmc attach` at other altitudes), fltfuse-5null with
five nullfilter instances (no operations registered: every request passes them
by); the bench checks each such mount with `fltmc instances`. A second table,
"Filter overhead", sets each stack against the empty stack (fltfuse) on the
small-file (meta) and 4 KiB random I/O rows: ratio, cost = 1 - ratio, cost per
filter = cost / instances, and PASS/MISS against the goals (a passthrough
instance costs at most 3%, five at most 15%; nullfilter instances nothing
measurable: the stack's median not below the empty stack's lowest round). The
verdicts are reported, never enforced: a MISS does not change the exit status.

Everything the bench creates (FUSE mounts and their daemons, bind mounts, the
ext4 mount, the loop device, the temporary directory) is removed on exit, on
errors and on SIGINT/SIGTERM/SIGHUP. A daemon that does not exit after
``fusermount3 -u`` gets SIGTERM, then SIGKILL, and its mount is detached lazily.

Python 3.11 standard library only; needs root and fio, mkfs.ext4, losetup,
blockdev, mount, umount, fusermount3, tar, du and grep.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

# The FUSE targets: name -> command that serves the directory {src} at {mnt} in
# the foreground until `fusermount3 -u {mnt}`. Placeholders: {src}, {mnt},
# {venv} (the project's virtualenv) and {passthroughfs} (pyfuse3's example,
# fetched from the pyfuse3 sdist unless --passthroughfs is given). A command
# without {src} serves {mnt} in place (LoggedFS 0.9 can do nothing else): the
# bench bind-mounts {src} at {mnt} before starting it. Adding a target is one line.
FUSE_TARGETS: dict[str, str] = {
    "fltfuse": "{venv}/bin/fltfuse mount -f {src} {mnt}",
    "fltfuse-1f": "{venv}/bin/fltfuse mount -f --filter passthrough {src} {mnt}",
    "fltfuse-5f": "{venv}/bin/fltfuse mount -f --filter passthrough {src} {mnt}",
    "fltfuse-5null": "{venv}/bin/fltfuse mount -f --filter nullfilter {src} {mnt}",
    "pyfuse3": "{venv}/bin/python {passthroughfs} {src} {mnt}",
    "loggedfs": "loggedfs -f -p {mnt}",
}
RAW = "raw"  # the ext4 directory itself: always measured, the reference for ratios

# More instances of a filter the mount loaded (--filter), attached once the mount is live with
# `FLTMC attach FILTER {mnt} -i INSTANCE -a ALTITUDE`: target -> (filter, instance, altitude) each.
# A filter loads once per volume, so a stack of five is one --filter and four attaches; the
# bench then checks with `FLTMC instances {mnt}` that every filter has as many instances as it
# should. The altitudes are the INF's default instance's plus 1 to 4.
FLTMC = "{venv}/bin/fltmc"
ATTACH: dict[str, list[tuple[str, str, str]]] = {
    "fltfuse-5f": [("passthrough", f"PassThrough {n}", str(370029 + n)) for n in range(2, 6)],
    "fltfuse-5null": [("nullfilter", f"NullFilter {n}", str(46999 + n)) for n in range(2, 6)],
}

# The "Filter overhead" section: every target with a filter stack against the empty stack
# EMPTY_STACK, on the small-file (meta) and 4 KiB random I/O rows. The goal per filter, as the
# most one instance may cost of the empty stack's throughput (n instances: n times that);
# None: nothing measurable, i.e. the stack's median is not below the empty stack's lowest
# round (for filters that register no operation, so every request passes them by).
EMPTY_STACK = "fltfuse"
OVERHEAD_ROWS = ("meta_create", "meta_stat", "meta_read", "meta_unlink", "randread", "randwrite")
PER_FILTER_GOAL: dict[str, float | None] = {"passthrough": 0.03, "nullfilter": None}

REQUIRED_TOOLS = ("fio", "mkfs.ext4", "losetup", "blockdev", "mount", "umount", "fusermount3", "tar", "du", "grep")


def log(msg: str) -> None:
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


class WorkloadError(RuntimeError):
    """A workload could not run or produced an implausible result on one target."""


# ------------------------------------------------------------------ helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 1G)")
    return int(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2).lower() or " ")))


def human_size(n: int) -> str:
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def run(
    argv: list[str], *, timeout: float = 120, check: bool = True, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[bytes]:
    """Run argv in its own process group; on a timeout or an interrupt the whole group
    is killed (fio's job processes would otherwise keep a FUSE mount busy)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if check and proc.returncode not in ok:
        msg = err.decode(errors="replace").strip()[-1500:]
        raise WorkloadError(f"{shlex.join(argv)} exited {proc.returncode}: {msg}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounts_at(path: str) -> list[str]:
    """File system types mounted at exactly `path`, bottom first."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), pre.split()[4])
            if point == path:
                found.append(post.split()[0])
    return found


def is_fuse(fstype: str) -> bool:
    return fstype == "fuse" or fstype.startswith("fuse.")


def read_through(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (cleanup must not stop half way),
    then act on the first that arrived."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            if got[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + got[0])


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    name: str
    template: str | None  # None: raw ext4
    attach: list[tuple[str, str, str]] = field(default_factory=list)  # ATTACH[name]

    @property
    def in_place(self) -> bool:
        return self.template is not None and "{src}" not in self.template

    def argv(self, values: dict[str, str], src: str, mnt: str) -> list[str]:
        assert self.template is not None
        quoted = {k: shlex.quote(v) for k, v in {**values, "src": src, "mnt": mnt}.items()}
        return shlex.split(self.template.format_map(quoted))

    @property
    def fltfuse(self) -> bool:
        """An fltfuse mount: a volume that fltmc can manage."""
        return self.template is not None and os.path.basename(shlex.split(self.template)[0]) == "fltfuse"

    @property
    def stack(self) -> list[str]:
        """The filter instances of the mount, lower case: its command's --filter, then ATTACH's."""
        words = shlex.split(self.template or "")
        loaded = [b for a, b in itertools.pairwise(words) if a == "--filter"]
        loaded += [w.removeprefix("--filter=") for w in words if w.startswith("--filter=")]
        return [f.lower() for f in loaded] + [f.lower() for f, _, _ in self.attach]

    def attach_commands(self) -> list[str]:
        """The fltmc commands of ATTACH, as templates (placeholders as in FUSE_TARGETS)."""
        return [f"{FLTMC} attach {f} {{mnt}} -i {shlex.quote(i)} -a {alt}" for f, i, alt in self.attach]

    def describe(self) -> str:
        if self.template is None:
            return "the ext4 directory itself"
        steps = [f"`{self.template}`", *(f"`{c}`" for c in self.attach_commands())]
        return ", then ".join(steps)


def pyfuse3_example(python: str, dest: str) -> tuple[str, str]:
    """Fetch pyfuse3's examples/passthroughfs.py from the sdist of the installed pyfuse3."""
    code = "import importlib.metadata as m; print(m.version('pyfuse3'))"
    version = run([python, "-c", code], timeout=60).stdout.decode().strip()
    os.makedirs(dest, exist_ok=True)
    run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"pyfuse3=={version}",
            "-d",
            dest,
        ],
        timeout=300,
    )
    sdist = os.path.join(dest, f"pyfuse3-{version}.tar.gz")
    with tarfile.open(sdist) as tar:
        member = tar.getmember(f"pyfuse3-{version}/examples/passthroughfs.py")
        data = tar.extractfile(member)
        assert data is not None
        path = os.path.join(dest, "passthroughfs.py")
        with open(path, "wb") as f:
            f.write(data.read())
    log(f"pyfuse3 target: examples/passthroughfs.py from the pyfuse3 {version} sdist")
    return path, f"examples/passthroughfs.py of the pyfuse3 {version} sdist (pip download)"


# -------------------------------------------------------------------- bench


@dataclass
class Mount:
    """One FUSE mount the bench made: the target's name, its command and daemon (if started)."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Bench:
    """Owns the ext4 image, its loop device and mount, and every FUSE mount and daemon."""

    args: argparse.Namespace
    dir: str = ""
    loopdev: str = ""
    ext4: str = ""
    src: str = ""
    tarball: str = ""
    tree_name: str = ""
    tree_files: int = 0
    tree_desc: str = ""
    values: dict[str, str] = field(default_factory=dict)  # template placeholders
    shown: dict[str, str] = field(default_factory=dict)  # the same, as the report describes them
    mounts: dict[str, Mount] = field(default_factory=dict)  # by mount point: what release() must undo
    ext4_mounted: bool = False
    grep_lines: dict[str, set[int]] = field(default_factory=dict)  # by target: tools' output check
    notes: list[str] = field(default_factory=list)

    # -- setup / teardown

    def make_dir(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fltfuse-bench-", dir=self.args.tmpdir)
        log(f"work dir {self.dir}")
        os.mkdir(os.path.join(self.dir, "logs"))

    def setup(self) -> None:
        a = self.args
        image = os.path.join(self.dir, "ext4.img")
        with open(image, "wb") as f:
            f.truncate(a.image_size)
        # no lazy init: ext4lazyinit would write inode tables in the background while we measure
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image], timeout=600)
        self.loopdev = run(["losetup", "--find", "--show", "--direct-io=on", image]).stdout.decode().strip()
        if not self.loopdev.startswith("/dev/loop"):
            raise RuntimeError(f"losetup printed {self.loopdev!r}")
        self.ext4 = os.path.join(self.dir, "ext4")
        os.mkdir(self.ext4)
        run(["mount", "-t", "ext4", self.loopdev, self.ext4])
        self.ext4_mounted = True
        log(f"ext4 on {self.loopdev} ({human_size(a.image_size)} sparse image, direct-io) at {self.ext4}")
        self.src = os.path.join(self.ext4, "src")
        os.mkdir(self.src, 0o755)
        if {"randread", "randwrite"} & set(a.workloads):
            log(f"laying out the {human_size(a.rand_size)} random-I/O file on raw ext4")
            fio(
                a,
                "layout",
                os.path.join(self.src, "rand.dat"),
                ["--rw=write", "--bs=1M", f"--size={a.rand_size}", "--end_fsync=1"],
                "write",
            )
        if "tools" in a.workloads:
            self.make_tarball()
        if not a.no_warmup:
            # the first big write after mkfs is reliably slower on a VM disk: do it unmeasured
            log(f"warm-up: {human_size(a.seq_size)} write + read on raw ext4 (not measured)")
            path = os.path.join(self.src, "warmup.dat")
            fio(a, "warmup", path, ["--rw=write", "--bs=1M", f"--size={a.seq_size}", "--end_fsync=1"], "write")
            drop_caches()
            read_through(path)
            os.unlink(path)
        drop_caches()

    def make_tarball(self) -> None:
        """Tar the Python standard library once, outside the mount (*-packages excluded)."""
        tree = os.path.realpath(self.args.tree)
        parent, self.tree_name = os.path.split(tree)
        entries: list[str] = []
        files = 0
        limit = self.args.tree_files
        for root, dirs, names in os.walk(tree):
            if limit and files >= limit:
                break
            dirs[:] = sorted(d for d in dirs if not d.endswith("-packages"))
            entries.append(os.path.relpath(root, parent))
            for name in sorted(names)[: limit - files if limit else None]:
                entries.append(os.path.relpath(os.path.join(root, name), parent))
                files += 1
        self.tree_files = files
        listing = os.path.join(self.dir, "tree.list")
        with open(listing, "w") as f:
            f.write("\n".join(entries) + "\n")
        self.tarball = os.path.join(self.dir, "tree.tar")
        run(["tar", "-cf", self.tarball, "-C", parent, "--no-recursion", "-T", listing], timeout=600)
        self.tree_desc = (
            f"{tree} ({files} files, {len(entries) - files} directories, "
            f"{os.path.getsize(self.tarball) / 1e6:.1f} MB tarball, *-packages excluded)"
        )
        log(f"tools tree: {self.tree_desc}")

    def teardown(self) -> None:
        with deferred_signals():
            for mnt in list(self.mounts):
                try:
                    self.release(mnt)
                except Exception as exc:
                    log(f"WARNING: releasing {mnt}: {exc}")
            if self.ext4_mounted:
                for attempt in range(20):
                    lazy = ["-l"] if attempt >= 10 else []
                    if run(["umount", *lazy, self.ext4], check=False).returncode == 0:
                        self.ext4_mounted = False
                        break
                    time.sleep(0.5)
                else:
                    log(f"WARNING: could not unmount {self.ext4}")
            if self.loopdev:
                for _ in range(20):
                    if run(["losetup", "-d", self.loopdev], check=False).returncode == 0:
                        break
                    time.sleep(0.5)
                else:
                    log(f"WARNING: could not detach {self.loopdev}")
            if self.args.keep_logs and self.dir:
                shutil.copytree(os.path.join(self.dir, "logs"), self.args.keep_logs, dirs_exist_ok=True)
                log(f"daemon logs copied to {self.args.keep_logs}")
            if self.dir:
                if self.ext4_mounted or any(mounts_at(os.path.join(self.dir, d)) for d in os.listdir(self.dir)):
                    log(f"WARNING: something is still mounted under {self.dir}; leaving it")
                else:
                    shutil.rmtree(self.dir, ignore_errors=True)

    # -- FUSE mounts

    @contextlib.contextmanager
    def mounted(self, target: Target, tag: str) -> Iterator[str]:
        """The directory to run a workload in: raw ext4 itself, or a fresh FUSE mount of it."""
        if target.template is None:
            yield self.src
            return
        mnt = os.path.join(self.dir, f"mnt-{target.name}")
        os.makedirs(mnt, exist_ok=True)
        if mounts_at(mnt):
            raise WorkloadError(f"{mnt} is still mounted from before")
        logpath = os.path.join(self.dir, "logs", f"{tag}.log")
        argv = target.argv(self.values, self.src, mnt)
        mount = self.mounts[mnt] = Mount(target.name, argv)
        ok = False
        try:
            with deferred_signals():
                if target.in_place:
                    run(["mount", "--bind", self.src, mnt])
                with open(logpath, "wb") as logf:
                    logf.write(f"$ {shlex.join(argv)}\n".encode())
                    logf.flush()
                    mount.proc = proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
                    )
            deadline = time.monotonic() + self.args.mount_timeout
            while not any(is_fuse(t) for t in mounts_at(mnt)):
                if proc.poll() is not None:
                    raise WorkloadError(f"{target.name} exited {proc.returncode} before mounting:\n{tail(logpath)}")
                if time.monotonic() > deadline:
                    raise WorkloadError(f"{target.name}: no FUSE mount at {mnt} after {self.args.mount_timeout:g}s")
                time.sleep(0.02)
            os.stat(os.path.join(mnt, "."))  # the daemon answers (and its control socket listens)
            self.build_stack(target, mnt)
            yield mnt
            ok = True
        finally:
            self.release(mnt)
            if ok and not self.args.keep_logs:
                os.unlink(logpath)  # LoggedFS logs every request: do not keep gigabytes around

    def build_stack(self, target: Target, mnt: str) -> None:
        """On an fltfuse mount, attach the target's ATTACH instances with fltmc, then check with
        `fltmc instances` that the volume has exactly the target's stack (the empty one: none;
        an INF with an automatic start type would otherwise slip a filter into every target)."""
        if not target.fltfuse:
            return
        fltmc = FLTMC.format_map(self.values)
        for name, instance, altitude in target.attach:
            run([fltmc, "attach", name, mnt, "-i", instance, "-a", altitude], timeout=60)
        listing = run([fltmc, "instances", mnt], timeout=60).stdout.decode(errors="replace")
        rows = listing.splitlines()[2:]  # a header and a rule of dashes; then one line per instance
        found = Counter(row.split()[0].lower() for row in rows if row.strip())
        want = Counter(target.stack)
        if found != want:
            raise WorkloadError(f"{target.name}: expected instances {dict(want)}, fltmc instances shows:\n{listing}")
        shown = ", ".join(f"{count} {name}" for name, count in want.items()) + " instance(s)" if want else "none"
        self.notes.append(f"{target.name}: every mount checked with `fltmc instances`: {shown}")

    def release(self, mnt: str) -> None:
        """Unmount `mnt` and stop its daemon: fusermount3 -u, wait; then SIGTERM, SIGKILL
        and a lazy detach for a daemon that does not go; then whatever is left at `mnt`."""
        mount = self.mounts[mnt]
        name, proc = mount.name, mount.proc
        with deferred_signals():
            for attempt in range(10):  # busy: a client may still be exiting
                if not any(is_fuse(t) for t in mounts_at(mnt)):
                    break
                if run(["fusermount3", "-u", mnt], check=False).returncode == 0:
                    break
                time.sleep(0.2 * (attempt + 1))
            killed = False
            try:
                if proc is not None:
                    proc.wait(self.args.unmount_timeout)
            except subprocess.TimeoutExpired:
                assert proc is not None
                log(f"WARNING: {name} still running {self.args.unmount_timeout:g}s after fusermount3 -u; stopping it")
                self.notes.append(f"{name}: daemon did not exit after fusermount3 -u; it was killed")
                killed = True
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)  # its own session: only the processes we started
                    try:
                        proc.wait(5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            for attempt in range(10):
                found = mounts_at(mnt)
                if not found:
                    break
                lazy = killed or attempt >= 3
                if is_fuse(found[-1]):
                    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mnt]
                else:  # the bind mount of an in-place target
                    argv = ["umount", *(["-l"] if lazy else []), mnt]
                if run(argv, check=False).returncode != 0:
                    time.sleep(0.3)
            if killed and os.path.basename(mount.argv[0]) == "fltfuse":
                run([mount.argv[0], "unmount", mnt], check=False)  # removes the dead daemon's state file
            del self.mounts[mnt]
            if proc is not None and proc.returncode not in (0, None) and not killed:
                log(f"{name}: daemon exited {proc.returncode}")


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- workloads


def fio(a: argparse.Namespace, name: str, filename: str, extra: list[str], direction: str) -> dict[str, float]:
    """Run one fio job and return its 'read' or 'write' section of the JSON output."""
    argv = [
        "fio",
        f"--name={name}",
        f"--filename={filename}",
        "--ioengine=psync",
        "--numjobs=1",
        "--fallocate=none",
        "--output-format=json",
        *extra,
    ]
    out = run(argv, timeout=a.cmd_timeout).stdout.decode(errors="replace")
    try:
        job = json.loads(out[out.index("{") :])["jobs"][0]  # fio may print warnings before the JSON
    except (ValueError, KeyError, IndexError) as exc:
        raise WorkloadError(f"fio printed no usable JSON: {out[-500:]}") from exc
    if job.get("error"):
        raise WorkloadError(f"fio job {name} failed with error {job['error']}")
    result: dict[str, float] = job[direction]
    return result


def workdir(root: str, tag: str) -> str:
    path = os.path.join(root, f"w-{tag}")
    os.mkdir(path)
    return path


def wl_seq(bench: Bench, root: str, tag: str) -> dict[str, float]:
    a = bench.args
    d = workdir(root, tag)
    seq = ["--rw=write", "--bs=1M", f"--size={a.seq_size}"]
    res = {}
    for key, name, extra in (("seqwrite", "seq0.dat", []), ("seqwrite_fsync", "seq.dat", ["--end_fsync=1"])):
        drop_caches()
        w = fio(a, key, os.path.join(d, name), seq + extra, "write")
        if w["io_bytes"] != a.seq_size:
            raise WorkloadError(f"{key} wrote {w['io_bytes']} bytes, not {a.seq_size}")
        res[key] = w["bw_bytes"] / 1e6
    os.unlink(os.path.join(d, "seq0.dat"))
    drop_caches()
    r = fio(a, "seqread", os.path.join(d, "seq.dat"), ["--rw=read", "--bs=1M", f"--size={a.seq_size}"], "read")
    if r["io_bytes"] != a.seq_size:
        raise WorkloadError(f"seqread read {r['io_bytes']} bytes, not {a.seq_size}")
    res["seqread"] = r["bw_bytes"] / 1e6
    os.unlink(os.path.join(d, "seq.dat"))
    os.rmdir(d)
    return res


def rand_job(bench: Bench, root: str, tag: str, rw: str, extra: list[str]) -> float:
    """4 KiB random I/O at QD1 over rand.dat, each block at most once, time-capped; IOPS."""
    a = bench.args
    argv = [f"--rw={rw}", "--bs=4k", f"--size={a.rand_size}", f"--io_size={a.rand_size}", f"--runtime={a.rand_runtime}"]
    direction = "read" if rw == "randread" else "write"
    res = fio(a, rw, os.path.join(root, "rand.dat"), argv + extra, direction)
    covered = res["io_bytes"] / a.rand_size
    if covered < 0.999:
        bench.notes.append(f"{tag}: stopped by the {a.rand_runtime}s cap after {covered:.0%} of the file")
    if res["io_bytes"] <= 0:
        raise WorkloadError(f"{rw} moved no data")
    return res["iops"]


def wl_randread(bench: Bench, root: str, tag: str) -> dict[str, float]:
    drop_caches()
    old = run(["blockdev", "--getra", bench.loopdev]).stdout.decode().strip()
    run(["blockdev", "--setra", "0", bench.loopdev])
    try:
        return {"randread": rand_job(bench, root, tag, "randread", [])}
    finally:
        run(["blockdev", "--setra", old, bench.loopdev])


def wl_randwrite(bench: Bench, root: str, tag: str) -> dict[str, float]:
    drop_caches()
    iops = rand_job(bench, root, tag, "randwrite", ["--end_fsync=1"])
    size = os.path.getsize(os.path.join(bench.src, "rand.dat"))
    if size != bench.args.rand_size:
        raise WorkloadError(f"rand.dat is {size} bytes after randwrite, not {bench.args.rand_size}")
    return {"randwrite": iops}


META_PHASES = ("create", "stat", "read", "unlink")


def meta_child(directory: str, nfiles: int, size: int) -> None:
    """The meta workload proper; runs in a child process, prints seconds per phase as JSON."""
    payload = os.urandom(size)
    names = [os.path.join(directory, f"f{i:05d}") for i in range(nfiles)]
    times: dict[str, float] = {}

    def create() -> None:
        for n in names:
            fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if os.write(fd, payload) != size:
                    raise SystemExit(f"short write to {n}")
            finally:
                os.close(fd)

    def stat() -> None:
        for n in names:
            if os.stat(n).st_size != size:
                raise SystemExit(f"{n} has the wrong size")

    def read() -> None:
        for n in names:
            fd = os.open(n, os.O_RDONLY)
            try:
                if os.read(fd, size + 1) != payload:
                    raise SystemExit(f"{n} has the wrong content")
            finally:
                os.close(fd)

    def unlink() -> None:
        for n in names:
            os.unlink(n)

    for phase, fn in zip(META_PHASES, (create, stat, read, unlink), strict=True):
        t = time.perf_counter()
        fn()
        times[phase] = time.perf_counter() - t
    if os.listdir(directory):
        raise SystemExit("the directory is not empty after unlinking every file")
    print(json.dumps(times))


def wl_meta(bench: Bench, root: str, tag: str) -> dict[str, float]:
    a = bench.args
    d = workdir(root, tag)
    drop_caches()
    argv = [sys.executable, os.path.realpath(__file__), "--meta-child", d, str(a.meta_files), str(a.meta_size)]
    times = json.loads(run(argv, timeout=a.cmd_timeout).stdout)
    os.rmdir(d)
    return {f"meta_{p}": a.meta_files / times[p] for p in META_PHASES}


def wl_tools(bench: Bench, root: str, tag: str) -> dict[str, float]:
    a = bench.args
    d = workdir(root, tag)
    tree = os.path.join(d, bench.tree_name)
    drop_caches()
    read_through(bench.tarball)  # cached, so that only the target is measured
    res: dict[str, float] = {}

    def timed(key: str, argv: list[str], ok: tuple[int, ...] = (0,)) -> bytes:
        t = time.perf_counter()
        out = run(argv, timeout=a.cmd_timeout, ok=ok).stdout
        res[key] = time.perf_counter() - t
        return out

    timed("tar", ["tar", "-xf", bench.tarball, "-C", d])
    timed("du", ["du", "-s", tree])
    matches = timed("grep", ["grep", "-r", "import", tree], ok=(0, 1)).count(b"\n")
    timed("rm", ["rm", "-rf", tree])
    os.rmdir(d)
    if bench.tree_files and matches == 0:
        raise WorkloadError("grep -r import found nothing in the extracted tree")
    bench.grep_lines.setdefault(tag.rsplit("-", 2)[0], set()).add(matches)  # tag: TARGET-tools-rN
    return res


WORKLOADS: dict[str, Callable[[Bench, str, str], dict[str, float]]] = {
    "seq": wl_seq,
    "randread": wl_randread,
    "randwrite": wl_randwrite,
    "meta": wl_meta,
    "tools": wl_tools,
}


@dataclass
class Row:
    key: str
    workload: str
    label: str
    unit: str

    @property
    def higher_is_better(self) -> bool:
        return self.unit != "s"


def table_rows(bench: Bench) -> list[Row]:
    a = bench.args
    s, r, n = human_size(a.seq_size), human_size(a.rand_size), a.meta_files
    rows = [
        Row("seqwrite", "seq", f"fio seq write {s}, bs=1M, no fsync", "MB/s"),
        Row("seqwrite_fsync", "seq", f"fio seq write {s}, bs=1M, end_fsync=1", "MB/s"),
        Row("seqread", "seq", f"fio seq read {s}, bs=1M, cold", "MB/s"),
        Row("randread", "randread", f"fio rand read 4K, psync QD1, {r} file, cold", "IOPS"),
        Row("randwrite", "randwrite", f"fio rand write 4K, psync QD1, {r} file, end_fsync=1", "IOPS"),
        Row("meta_create", "meta", f"meta: create {n} x {human_size(a.meta_size)}", "ops/s"),
        Row("meta_stat", "meta", f"meta: stat {n}", "ops/s"),
        Row("meta_read", "meta", f"meta: read {n}", "ops/s"),
        Row("meta_unlink", "meta", f"meta: unlink {n}", "ops/s"),
        Row("tar", "tools", f"tools: tar -xf ({bench.tree_files} files)", "s"),
        Row("du", "tools", "tools: du -s", "s"),
        Row("grep", "tools", "tools: grep -r import", "s"),
        Row("rm", "tools", "tools: rm -rf", "s"),
    ]
    return [row for row in rows if row.workload in a.workloads]


def run_order(targets: list[Target], rnd: int, index: int) -> list[Target]:
    """Targets for workload `index` of round `rnd`: rotated by one more each workload and
    round, so that no target always goes first (and raw is not always first or last)."""
    k = (rnd + index) % len(targets)
    return targets[k:] + targets[:k]


def measure(bench: Bench, targets: list[Target], results: dict[str, dict[str, list[float | None]]]) -> list[str]:
    a = bench.args
    failures = []
    for rnd in range(a.rounds):
        for index, workload in enumerate(a.workloads):
            for target in run_order(targets, rnd, index):
                tag = f"{target.name}-{workload}-r{rnd + 1}"
                t0 = time.monotonic()
                try:
                    with bench.mounted(target, tag) as root:
                        values = WORKLOADS[workload](bench, root, tag)
                except (WorkloadError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
                    msg = f"{target.name} {workload} round {rnd + 1}: {type(exc).__name__}: {exc}"
                    log("FAILED " + msg)
                    failures.append(msg.replace("\n", " | "))
                    values = {}
                finally:
                    for name in os.listdir(bench.src):  # what a failed workload left behind
                        if name.startswith("w-"):
                            shutil.rmtree(os.path.join(bench.src, name), ignore_errors=True)
                for key, value in values.items():
                    results[target.name][key][rnd] = value
                shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                log(f"round {rnd + 1}/{a.rounds} {workload:9} {target.name:13} {time.monotonic() - t0:6.1f}s  {shown}")
    return failures


# ------------------------------------------------------------------- report


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2g}"


def cell(values: list[float]) -> str:
    if not values:
        return "FAIL"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"


@dataclass
class Overhead:
    """One OVERHEAD_ROWS row of one filter-stack target, against the empty stack."""

    row: str
    target: str
    instances: int
    filters: str  # the stack's filters, "+"-joined
    goal: str  # as the report states it
    ratio: float | None = None  # the stack's median / the empty stack's median
    cost: float | None = None  # 1 - ratio
    cost_per_filter: float | None = None  # cost / instances
    verdict: str = "-"  # PASS, MISS, or why there is none


def filter_overhead(
    bench: Bench, targets: list[Target], results: dict[str, dict[str, list[float | None]]]
) -> list[Overhead]:
    """Every filter-stack target against EMPTY_STACK on the OVERHEAD_ROWS, judged on PER_FILTER_GOAL."""
    stacks = [t for t in targets if t.stack]
    if EMPTY_STACK not in results or not stacks:
        return []
    entries = []
    rows = {row.key: row for row in table_rows(bench)}  # those of the workloads run
    for row in (rows[key] for key in OVERHEAD_ROWS if key in rows):
        base = [v for v in results[EMPTY_STACK][row.key] if v is not None]
        for t in stacks:
            got = [v for v in results[t.name][row.key] if v is not None]
            n, kinds = len(t.stack), sorted(set(t.stack))
            known = len(kinds) == 1 and kinds[0] in PER_FILTER_GOAL
            goal = PER_FILTER_GOAL[kinds[0]] if known else None
            if not known:
                text = "-"
            elif goal is None:
                text = f"not below {EMPTY_STACK}'s lowest round"
            else:
                text = f"<= {goal * n:.0%}" + (f" ({goal:.0%} each)" if n > 1 else "")
            e = Overhead(row.key, t.name, n, "+".join(kinds), text)
            if base and got:
                med = statistics.median(got)
                e.ratio = med / statistics.median(base)  # every overhead row is a rate: higher is better
                e.cost = 1 - e.ratio
                e.cost_per_filter = e.cost / n
                if known and goal is not None:
                    e.verdict = "PASS" if e.cost <= goal * n else "MISS"
                elif known:
                    e.verdict = ("PASS" if med >= min(base) else "MISS") if len(base) > 1 else "n/a (1 round)"
            entries.append(e)
    return entries


def overhead_section(
    bench: Bench, results: dict[str, dict[str, list[float | None]]], entries: list[Overhead]
) -> list[str]:
    """The report's "Filter overhead" table and its verdict counts."""
    if not entries:
        return []
    lines = [
        f"Filter overhead: each filter stack's median against the empty stack's (`{EMPTY_STACK}`): "
        f"ratio = stack/{EMPTY_STACK}, cost = 1 - ratio, per filter = cost / instances. Goals: one "
        "passthrough instance costs at most 3% of the empty stack's throughput, five at most 15%; a request "
        "no filter registered for (nullfilter registers none) pays nothing measurable: the stack's median "
        f"is not below {EMPTY_STACK}'s lowest round (needs 2 rounds or more).",
        "",
        "| workload | unit | stack | instances | median | ratio | cost | per filter | goal | verdict |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    rows = {row.key: row for row in table_rows(bench)}
    for row in (rows[key] for key in dict.fromkeys(e.row for e in entries)):
        mine = [e for e in entries if e.row == row.key]
        base = [v for v in results[EMPTY_STACK][row.key] if v is not None]
        lines.append(f"| {row.label} | {row.unit} | `{EMPTY_STACK}` (empty) | 0 | {cell(base)} | 1 | | | | |")
        for e in mine:
            got = [v for v in results[e.target][row.key] if v is not None]
            numbers = "- | - | -"
            if e.ratio is not None and e.cost is not None and e.cost_per_filter is not None:
                numbers = f"{e.ratio:.3f} | {e.cost:.1%} | {e.cost_per_filter:.1%}"
            lines.append(
                f"| | | `{e.target}` | {e.instances} {e.filters} | {cell(got)} | {numbers} | {e.goal} | {e.verdict} |"
            )
    summary = []
    for target in dict.fromkeys(e.target for e in entries):
        verdicts = [e.verdict for e in entries if e.target == target]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in ("PASS", "MISS") if v in verdicts)
        summary.append(f"`{target}` {counts or 'no verdict'}")
    return [*lines, "", "Verdicts: " + "; ".join(summary) + "."]


def report(
    bench: Bench,
    targets: list[Target],
    results: dict[str, dict[str, list[float | None]]],
    failures: list[str],
    started: datetime.datetime,
    overhead: list[Overhead],
) -> str:
    a = bench.args
    fuse = [t for t in targets if t.template is not None]
    head = ["workload", "unit", *(t.name for t in targets), *(f"{t.name}/raw" for t in fuse)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for row in table_rows(bench):
        got = {t.name: [v for v in results[t.name][row.key] if v is not None] for t in targets}
        cells = [row.label, row.unit, *(cell(got[t.name]) for t in targets)]
        for t in fuse:
            if got[RAW] and got[t.name]:
                raw_med, med = statistics.median(got[RAW]), statistics.median(got[t.name])
                ratio = med / raw_med if row.higher_is_better else raw_med / med
                cells.append(fmt(ratio))
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    out = [
        f"fltfuse bench, {started:%Y-%m-%d %H:%M} - {datetime.datetime.now():%H:%M}, "
        f"{a.rounds} round(s), interleaved{' (--quick)' if a.quick else ''}",
        "",
        *lines,
        "",
        "Cells: median [min-max] over the rounds. Ratios: the target's median relative to raw's median "
        "(target/raw for rates, raw/target for seconds); 1.0 = as fast as raw ext4. MB = 10^6 bytes.",
        "",
        *overhead_section(bench, results, overhead),
        *([""] if overhead else []),
        "Command: `" + shlex.join(["scripts/bench.py", *sys.argv[1:]]) + "`",
        "",
        "Targets:",
        *(f"- `{t.name}`: {t.describe()}" for t in targets),
        *(f"- `{{{k}}}` = {bench.shown.get(k, v)}" for k, v in bench.values.items()),
        f"- versions: {versions(bench)}",
        "",
        machine_line(a),
    ]
    if bench.tree_desc:
        out += ["", f"Tools tree: {bench.tree_desc}."]
    notes = list(dict.fromkeys(bench.notes))
    if bench.grep_lines:
        counts = set().union(*bench.grep_lines.values())
        per = ", ".join(f"{name} {sorted(c)}" for name, c in bench.grep_lines.items())
        same = "the same number of lines on every target" if len(counts) == 1 else "DIFFERENT numbers of lines"
        notes.insert(0, f"grep -r import printed {same}: {per}")
    if notes:
        out += ["", "Notes:", *(f"- {n}" for n in notes)]
    if failures:
        out += ["", "Failures:", *(f"- {f}" for f in failures)]
    return "\n".join(out) + "\n"


def versions(bench: Bench) -> str:
    """fltfuse's commit, pyfuse3's version, LoggedFS's Debian package version."""
    git = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False).stdout.decode().strip()
    code = "import importlib.metadata as m; print(m.version('pyfuse3'))"
    python = os.path.join(bench.args.venv, "bin", "python")
    pyfuse3 = run([python, "-c", code], check=False).stdout.decode().strip() if os.path.exists(python) else ""
    loggedfs = run(["dpkg-query", "-W", "-f", "${Version}", "loggedfs"], check=False).stdout.decode().strip()
    return f"fltfuse {git or '?'}, pyfuse3 {pyfuse3 or '?'}, loggedfs {loggedfs or '?'}"


def machine_line(a: argparse.Namespace) -> str:
    fio_version = run(["fio", "--version"], check=False).stdout.decode().strip()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (
        f"Machine: kernel {platform.release()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, load average at the "
        f"end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}; {fio_version}; ext4 on a {human_size(a.image_size)} "
        f"sparse image on a loop device (direct-io=on) in {a.tmpdir}."
    )


# --------------------------------------------------------------------- main


def default_tree() -> str:
    """Debian's Python 3.11 standard library (the same tree on every machine of this kind), else ours."""
    debian = "/usr/lib/python3.11"
    return debian if os.path.isfile(os.path.join(debian, "os.py")) else sysconfig.get_paths()["stdlib"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark fltfuse against raw ext4, pyfuse3's passthroughfs example and LoggedFS.",
        epilog=f"FUSE targets: {', '.join(f'{k}: {v}' for k, v in FUSE_TARGETS.items())}. See BENCHMARKS.md.",
    )
    p.add_argument(
        "--targets",
        help=f"comma list (default: every available one of {RAW},{','.join(FUSE_TARGETS)}); {RAW} is always measured",
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 round, 3 s random-I/O cap")
    p.add_argument("--seq-size", type=parse_size, help="sequential file (default 1G, --quick 64M)")
    p.add_argument("--rand-size", type=parse_size, help="random-I/O file (default 512M, --quick 64M)")
    p.add_argument("--rand-runtime", type=int, help="cap on one random-I/O job in seconds (default 30, --quick 3)")
    p.add_argument("--meta-files", type=int, help="files in the meta workload (default 5000, --quick 500)")
    p.add_argument("--meta-size", type=parse_size, default=1024, help="bytes per file (default 1K)")
    p.add_argument("--tree", default=default_tree(), help="tree to tar (default: %(default)s)")
    p.add_argument("--tree-files", type=int, help="cap on files taken from --tree (default none, --quick 300)")
    p.add_argument("--image-size", type=parse_size, help="ext4 image (default 2 x seq + rand + 1G)")
    p.add_argument("--tmpdir", default="/var/tmp", help="where the work dir goes (default %(default)s)")
    p.add_argument("--venv", default=os.path.join(REPO, ".venv"), help="fltfuse's virtualenv (default %(default)s)")
    p.add_argument("--passthroughfs", help="pyfuse3's examples/passthroughfs.py (default: fetched from the sdist)")
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured write + read after mkfs")
    p.add_argument("--mount-timeout", type=float, default=30, help="seconds until a mount must be live")
    p.add_argument("--unmount-timeout", type=float, default=20, help="seconds a daemon gets to exit after unmount")
    p.add_argument("--cmd-timeout", type=float, default=900, help="limit for one fio/tool/meta command in seconds")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument("--json", help="write every measured number to this file")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs here at the end")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.seq_size = a.seq_size or parse_size("64M" if q else "1G")
    a.rand_size = a.rand_size or parse_size("64M" if q else "512M")
    a.rand_runtime = a.rand_runtime or (3 if q else 30)
    a.meta_files = a.meta_files or (500 if q else 5000)
    a.tree_files = a.tree_files if a.tree_files is not None else (300 if q else 0)
    a.image_size = a.image_size or 2 * a.seq_size + a.rand_size + (1 << 30)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in a.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.targets:
        a.targets = list(dict.fromkeys(t.strip() for t in a.targets.split(",") if t.strip()))
        for t in a.targets:
            if t != RAW and t not in FUSE_TARGETS:
                p.error(f"unknown target {t!r}; choose from {RAW}, {', '.join(FUSE_TARGETS)}")
    return a


def select_targets(bench: Bench) -> list[Target]:
    """raw plus the FUSE targets asked for; by default those available, skipping the others."""
    a = bench.args
    explicit = a.targets is not None
    names = [n for n in (a.targets or [RAW, *FUSE_TARGETS]) if n != RAW]
    bench.values = {"venv": a.venv}
    if any("{passthroughfs}" in FUSE_TARGETS[n] for n in names):
        if a.passthroughfs:
            if not os.path.isfile(a.passthroughfs):
                raise SystemExit(f"bench: --passthroughfs {a.passthroughfs}: no such file")
            bench.values["passthroughfs"] = os.path.realpath(a.passthroughfs)
        else:
            try:
                bench.values["passthroughfs"], bench.shown["passthroughfs"] = pyfuse3_example(
                    os.path.join(a.venv, "bin", "python"), os.path.join(bench.dir, "pyfuse3")
                )
            except (WorkloadError, OSError, KeyError, tarfile.TarError, subprocess.TimeoutExpired) as exc:
                log(f"could not fetch pyfuse3's passthroughfs.py: {exc}")
    targets = [Target(RAW, None)]
    for name in names:
        target = Target(name, FUSE_TARGETS[name], ATTACH.get(name, []))
        try:
            argv0 = target.argv(bench.values, "SRC", "MNT")[0]
            missing = None if shutil.which(argv0) else f"{argv0} is not installed"
            fltmc = FLTMC.format_map(bench.values)
            if not missing and target.fltfuse and not shutil.which(fltmc):
                missing = f"{fltmc} is not installed"
        except KeyError as exc:
            missing = f"no value for {{{exc.args[0]}}}"
        if missing:
            if explicit:
                raise SystemExit(f"bench: target {name} is not available: {missing}")
            log(f"skipping target {name}: {missing}")
            bench.notes.append(f"target {name} skipped: {missing}")
            continue
        targets.append(target)
    return targets


def main(argv: list[str]) -> int:
    if argv[:1] == ["--meta-child"]:
        meta_child(argv[1], int(argv[2]), int(argv[3]))
        return 0
    a = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (loop device, mounts, drop_caches)")
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing:
        raise SystemExit(f"bench: missing tools: {', '.join(missing)} (apt-get install fio e2fsprogs fuse3 ...)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("bench: /dev/fuse is missing (modprobe fuse)")

    def on_signal(signum: int, frame: object) -> None:
        log(f"{signal.Signals(signum).name} received: cleaning up")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    started = datetime.datetime.now()
    bench = Bench(a)
    try:
        bench.make_dir()
        targets = select_targets(bench)
        bench.setup()
        log(f"targets: {', '.join(t.name for t in targets)}; workloads: {', '.join(a.workloads)}; {a.rounds} round(s)")
        results: dict[str, dict[str, list[float | None]]] = {
            t.name: {row.key: [None] * a.rounds for row in table_rows(bench)} for t in targets
        }
        failures = measure(bench, targets, results)
        overhead = filter_overhead(bench, targets, results)
        text = report(bench, targets, results, failures, started, overhead)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        if a.json:
            with open(a.json, "w") as f:
                doc = {
                    "command": sys.argv,
                    "started": started.isoformat(timespec="seconds"),
                    "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                    "config": {k: v for k, v in vars(a).items() if isinstance(v, int | float | str | list | None)},
                    "kernel": platform.release(),
                    "targets": {t.name: t.template for t in targets},
                    "attach": {t.name: t.attach_commands() for t in targets if t.attach},
                    "units": {row.key: row.unit for row in table_rows(bench)},
                    "results": results,
                    "filter_overhead": [asdict(e) for e in overhead],
                    "failures": failures,
                    "notes": bench.notes,
                }
                json.dump(doc, f, indent=1)
        return 1 if failures else 0
    finally:
        bench.teardown()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
