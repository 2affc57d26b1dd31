#!/bin/sh
# autogen.sh: generate configure and Makefile.in from a git checkout.
set -e
cd "$(dirname "$0")"
mkdir -p m4 build-aux
autoreconf -fi
# the TAP test driver is not copied by automake on its own
cp -f "$(automake --print-libdir)/tap-driver.sh" build-aux/tap-driver.sh
