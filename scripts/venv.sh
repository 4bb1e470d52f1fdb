#!/usr/bin/env bash
# Usage: scripts/venv.sh VENV_DIR REQUIREMENTS_FILE [PYTHON]
# Creates VENV_DIR with PYTHON (default python3; pypy3 for the PyPy family)
# if missing and installs the pinned requirements into it. Re-running is
# cheap: a stamp file records which requirements file content was installed.
set -euo pipefail
venv=$1
req=$2
python=${3:-python3}
stamp="$venv/.installed-$(sha1sum "$req" | cut -c1-12)"
if [ -f "$stamp" ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
rm -f "$venv"/.installed-*
touch "$stamp"
