#!/usr/bin/env bash
# An outbox backlog (default 100,000 events): enqueue rate, drain rate to the edge broker,
# time until the cloud has every event through a roost bridge. Usage: bench/outbox.sh [--events N]
source "$(dirname "$0")/common.sh"
exec "$ROOST" bench outbox "$@"
