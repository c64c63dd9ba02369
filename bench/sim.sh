#!/usr/bin/env bash
# The fleet benchmark: N stores in one process converge successive rollouts.
# Usage: bench/sim.sh [roost sim flags]   (default: --stores 2000 --topology direct --rollouts 2)
source "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || set -- --stores 2000 --topology direct --rollouts 2
ROOST_LOG=${ROOST_LOG:-error} exec "$ROOST" sim --json "$@"
