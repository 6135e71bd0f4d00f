#!/usr/bin/env bash
# Installs everything fltfuse needs on a Debian/Ubuntu machine, idempotently:
# the system packages, a virtualenv at .venv with fltfuse and its test tools,
# and the fltfuse/fltmc commands (plus the mount.fuse helper) on root's PATH.
# Run as root. Used by scripts/setup.sh and scripts/test.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

packages=(
  fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev  # pyfuse3 builds against libfuse3
  e2fsprogs util-linux mount                                   # mkfs.ext4, losetup, mount
  attr acl                                                     # getfattr/setfattr, getfacl/setfacl
  fio loggedfs                                                 # the benchmark: I/O rows, and LoggedFS as a peer
  rsync sqlite3 git make tar coreutils findutils psmisc        # the tools the integration tests use
  clamav clamav-daemon                                         # the scanner's ClamAV engine: clamd, clamscan, sigtool
)

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (it installs system packages)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The distribution's Python (world-readable, as on a fresh machine; the unit tier
# also runs as an unprivileged user), unless PYTHON names another one.
python=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: fltfuse needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2
  exit 1
fi
if [ -x "$here/.venv/bin/python" ] && [ "$(readlink -f "$here/.venv/bin/python")" != "$(readlink -f "$python")" ]; then
  rm -rf "$here/.venv"  # made with another interpreter
fi
if [ ! -x "$here/.venv/bin/python" ]; then
  "$python" -m venv "$here/.venv"
fi
stamp="$here/.venv/.installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  "$here/.venv/bin/pip" install -q --upgrade pip
  "$here/.venv/bin/pip" install -q -e "$here[dev]"
  touch "$stamp"
fi

# The commands on root's PATH. `mount -t fuse.fltfuse` runs fuse3's mount.fuse3,
# which strips fstab's own options and runs `fltfuse SOURCE MOUNTPOINT -o ...` from PATH.
ln -sf "$here/.venv/bin/fltfuse" /usr/local/bin/fltfuse
ln -sf "$here/.venv/bin/fltmc" /usr/local/bin/fltmc
ln -sf "$here/.venv/bin/minispy" /usr/local/bin/minispy
ln -sf "$here/.venv/bin/fltfuse-scanner" /usr/local/bin/fltfuse-scanner
rm -f /usr/local/sbin/mount.fuse.fltfuse  # an earlier install's helper link: mount(8) never looked there
