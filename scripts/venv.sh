#!/usr/bin/env bash
# Usage: scripts/venv.sh VENV_DIR REQUIREMENTS_FILE
# Creates VENV_DIR with python3 if missing and installs the pinned
# requirements into it. Re-running is cheap: a stamp file records which
# requirements file content was installed.
set -euo pipefail
venv=$1
req=$2
stamp="$venv/.installed-$(sha1sum "$req" | cut -c1-12)"
if [ -f "$stamp" ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
rm -f "$venv"/.installed-*
touch "$stamp"
