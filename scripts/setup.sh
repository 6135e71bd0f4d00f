#!/usr/bin/env bash
# README command 1. Installs fltfuse and mounts the default volume (an ext4
# image on a loop device, with the default filter stack) in the background.
#   sudo scripts/setup.sh [MOUNTPOINT]        default MOUNTPOINT: /mnt/fltfuse
# Environment: FLTFUSE_IMAGE (default /var/lib/fltfuse/default.img),
#              FLTFUSE_SIZE (size of a new image, default 4G).
# Idempotent: an existing image is kept, a live mount is left as it is.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/install.sh"

mnt=${1:-/mnt/fltfuse}
image=${FLTFUSE_IMAGE:-/var/lib/fltfuse/default.img}
fltfuse=$here/.venv/bin/fltfuse

if [ ! -f "$image" ]; then
  "$fltfuse" volume create "$image" --size "${FLTFUSE_SIZE:-4G}"
fi
mkdir -p "$mnt"
if grep -q " $(realpath "$mnt") fuse.fltfuse " /proc/mounts; then
  echo "fltfuse: $image is already mounted at $mnt"
else
  "$fltfuse" mount "$image" "$mnt"
fi
cat <<TXT

Use it:        cd $mnt && ls -la        (any tool works: cp, tar, git, sqlite3, make ...)
Volumes:       fltmc volumes
Unmount:       fltfuse unmount $mnt
Run the tests: scripts/test.sh
TXT
