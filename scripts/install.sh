#!/usr/bin/env bash
# Install the server into ./.venv (created if missing).
#   scripts/install.sh         runtime only
#   scripts/install.sh --dev   plus test tools, Ray Serve (the Ray test tier), and Chromium + CJK fonts for the
#                              browser test (apt)
#   scripts/install.sh --ray   runtime plus Ray Serve (requirements-ray.txt), for `python -m zimage serve-ray`
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
ray=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1; ray=1 ;;
    --ray) ray=1 ;;
    *) echo "usage: scripts/install.sh [--dev] [--ray]" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      sudo_cmd=""
      [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
      echo "installing chromium and fonts-noto-cjk (browser test)"
      $sudo_cmd apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
    else
      echo "warning: no chromium and no apt-get: the browser test will be skipped" >&2
    fi
  fi
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
if [ "$ray" = 1 ]; then
  .venv/bin/python -m pip install --quiet -r requirements-ray.txt
fi
# Supervisor's socket, pid file and logs for deploy/supervisor/supervisord.conf: owner-only.
mkdir -p run
chmod 700 run
echo "installed into .venv"
