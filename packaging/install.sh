#!/bin/sh
# Install or upgrade Hausmeister from this offline bundle; no network is needed or used.
#   sh install.sh            (as root; --help lists the options: --prefix, --data-dir, ...)
# The work is done by install.py (Python standard library only), which first checks the bundle's
# signature and hashes. python3 is the one thing it needs from the system, because nothing from
# the bundle may run before that check.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if command -v python3 >/dev/null 2>&1; then
    # -I: ignore PYTHON* variables and the user's site folder; -B: write no byte code here
    exec python3 -I -B "$here/install.py" "$@"
fi
echo "install.sh: error: python3 is missing, and it checks this bundle's signature before anything from the bundle is installed; install python3-minimal from your Debian 12 media (apt-get install python3-minimal), then run install.sh again" >&2
exit 2
