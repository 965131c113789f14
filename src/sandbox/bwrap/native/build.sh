#!/bin/sh
# Builds berth-exec, the bwrap driver's exec helper (see berth-exec.c), as a static binary and
# installs it where the driver looks by default. Run as root from scripts/setup:
#   sh src/sandbox/bwrap/native/build.sh [destination]
# The default destination is under /usr, which every sandbox sees read-only, so the helper is
# reachable both before and after it enters a sandbox. Needs gcc and the static libc (libc6-dev).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
destination=${1:-/usr/local/lib/berth/berth-exec}
mkdir -p "$(dirname "$destination")"
temporary="$destination.tmp.$$"
gcc -static -Os -Wall -Wextra -Werror -o "$temporary" "$here/berth-exec.c"
strip "$temporary"
chmod 0755 "$temporary"
mv -f "$temporary" "$destination"
echo "built $destination"
