# Sourced by the bench scripts: finds the roost binary (ROOST=path overrides; default the
# release build, built if missing: figures come from release builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${ROOST:-}" ]; then
  ROOST=target/release/roost
  [ -x "$ROOST" ] || cargo build --release --workspace --bins >&2
fi
# The fleet benchmark holds thousands of sockets and SQLite files open.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "bench: $("$ROOST" --version 2>/dev/null || echo roost) at $ROOST on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
