#!/usr/bin/env bash
# System packages the tests need, installed from Debian/Ubuntu apt only when missing:
# chromium (the browser test) and npm (the offline Visdom page assets).
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "error: the tests need ${missing[*]}; install them with your package manager" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || {
        echo "error: the tests need ${missing[*]}: run \`apt-get install ${missing[*]}\` as root" >&2
        exit 1; }
    sudo=(sudo)
fi
echo "installing ${missing[*]} with apt-get (test dependencies)"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
