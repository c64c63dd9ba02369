#!/usr/bin/env bash
# One bridged store of real processes: `roost rollout` -> `converged` at the cloud and
# drift edit -> `drift.detected` at the cloud, p50/p99. Usage: bench/latency.sh [--trials N]
source "$(dirname "$0")/common.sh"
exec "$ROOST" bench latency "$@"
