#!/usr/bin/env bash
# A real terminal for the `loopwatch top` tests (tmux: send-keys to type, capture-pane to read the screen).
set -euo pipefail
command -v tmux >/dev/null && exit 0
apt-get update -qq && apt-get install -y -qq tmux >/dev/null
