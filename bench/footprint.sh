#!/usr/bin/env bash
# A real store agent (files target) with its edge broker, bridge and a cloud broker
# converges a revision of 50 objects, idles, and reports its RSS, idle CPU, fds, threads and
# the binaries' sizes. The agent runs as the lean `roost-agent` binary (AGENT_BIN=path
# overrides; AGENT_BIN=none runs `roost agent`).
# Usage: bench/footprint.sh [--idle SECONDS] [--objects N]
source "$(dirname "$0")/common.sh"
# The size-optimized build (cargo build --profile agent -p roost-agent --bin roost-agent) when there
# is one, else the release build's.
if [ -z "${AGENT_BIN:-}" ]; then
  AGENT_BIN=$(dirname "$ROOST")/roost-agent
  [ "$ROOST" = target/release/roost ] && [ -x target/agent/roost-agent ] && AGENT_BIN=target/agent/roost-agent
fi
if [ "$AGENT_BIN" = none ]; then
  exec "$ROOST" bench footprint "$@"
fi
if [ ! -x "$AGENT_BIN" ]; then
  echo "footprint: no $AGENT_BIN (cargo build --release --workspace --bins builds it)" >&2
  exit 1
fi
exec "$ROOST" bench footprint --agent-bin "$AGENT_BIN" "$@"
