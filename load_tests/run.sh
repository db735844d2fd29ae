#!/usr/bin/env bash
# Load test aioffload with Locust: start a server (or --url), run headless, check thresholds.
# Usage and options: load_tests/run.sh --help; how to read the results: load_tests/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/run.py" "$@"
