#!/usr/bin/env bash
# 100,000 QoS 1 messages of ~200 bytes from a mosquitto edge broker to a mosquitto cloud
# broker, alternately through `roost bridge` and mosquitto's built-in bridge; then with the
# cloud broker SIGKILLed and restarted mid-run. Usage: bench/bridge-vs-mosquitto.sh
# [--messages N] [--runs N] [--no-restart] [--mosquitto PATH]
source "$(dirname "$0")/common.sh"
exec "$ROOST" bench bridge-load "$@"
