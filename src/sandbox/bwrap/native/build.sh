#!/bin/sh
# Builds the bwrap driver's two static helpers and installs them where the driver looks by
# default. Run as root from scripts/setup:
#   sh src/sandbox/bwrap/native/build.sh [destination directory]
#   berth-exec   launches sandboxes and mounts workspace disks (berth-exec.c)
#   berth-agent  the sandbox's init, which runs commands for Berth (../../agent/berth-agent.c)
# The default destination is under /usr, which every sandbox sees read-only, so the agent is
# reachable inside. Needs gcc and the static libc (libc6-dev).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
destination=${1:-/usr/local/lib/berth}
mkdir -p "$destination"
build() {
  temporary="$destination/$1.tmp.$$"
  gcc -static -Os -Wall -Wextra -Werror -o "$temporary" "$2"
  strip "$temporary"
  chmod 0755 "$temporary"
  mv -f "$temporary" "$destination/$1"
  echo "built $destination/$1"
}
build berth-exec "$here/berth-exec.c"
build berth-agent "$here/../../agent/berth-agent.c"
