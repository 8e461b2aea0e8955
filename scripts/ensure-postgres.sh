#!/bin/sh
# Make sure PostgreSQL's server binaries are installed for the tests that run the store's index on a real
# PostgreSQL server (tests/postgres_server.py starts one on 127.0.0.1 from them). `make test` runs this
# before pytest; on a fresh Debian 12 machine it installs Debian's package, elsewhere it does nothing.
set -eu
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
echo "PostgreSQL is not installed: installing Debian's postgresql package for the index tests" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
# The tests start a server of their own; the cluster the package may create and start is not used.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
