#!/usr/bin/env bash
# A real `roost agent` (files target) with its edge broker, bridge and a cloud broker
# converges a revision of 50 objects, idles, and reports its RSS, idle CPU, fds, threads and
# the binary's size. Usage: bench/footprint.sh [--idle SECONDS] [--objects N]
source "$(dirname "$0")/common.sh"
exec "$ROOST" bench footprint "$@"
