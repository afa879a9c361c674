#!/usr/bin/env bash
# Install quantdag on an air-gapped host from a wheelhouse made by
# infra/build_wheelhouse.sh (which copies this script into it). Never contacts an index.
#
#   install_offline.sh [WHEELHOUSE]            pip resolves against the wheelhouse and
#       what is installed; fails if the host lacks or has a wrong version of a package
#       the wheelhouse leaves out (host-requirements.txt: torch, transformers, ...).
#   install_offline.sh --no-deps [WHEELHOUSE]  installs every wheel as it is and touches
#       nothing else: for hosts whose torch (e.g. NVIDIA's own build) must stay. It then
#       checks that each host package is present and prints version mismatches and
#       `pip check` findings as warnings.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: install_offline.sh [--no-deps] [--python PY] [--dry-run] [WHEELHOUSE]
  WHEELHOUSE     folder with the wheels (default: this script's folder)
  --no-deps      install the wheels without dependency resolution (keeps the host's torch)
  --python PY    interpreter to install into (default: python3)
  --dry-run      print the commands only
EOF
}

WHEELHOUSE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=python3
NO_DEPS=0
DRY_RUN=0
while (($#)); do
    case "$1" in
        --no-deps) NO_DEPS=1; shift ;;
        --python) PYTHON="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) WHEELHOUSE="$(cd "$1" && pwd)"; shift ;;
    esac
done

for f in requirements.txt host-requirements.txt; do
    [[ -f "$WHEELHOUSE/$f" ]] || { echo "$WHEELHOUSE/$f missing: not a wheelhouse from build_wheelhouse.sh" >&2; exit 2; }
done
shopt -s nullglob
WHEELS=("$WHEELHOUSE"/*.whl)
((${#WHEELS[@]})) || { echo "no wheels in $WHEELHOUSE" >&2; exit 2; }

run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    ((DRY_RUN)) || "$@"
}

echo "wheelhouse $WHEELHOUSE: ${#WHEELS[@]} wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
# --isolated: ignore pip config files and PIP_* variables (an index URL set there).
PIP=("$PYTHON" -m pip --isolated install --no-index)

if ((NO_DEPS == 0)); then
    run "${PIP[@]}" --find-links "$WHEELHOUSE" --requirement "$WHEELHOUSE/requirements.txt"
    exit 0
fi

run "${PIP[@]}" --no-deps "${WHEELS[@]}"
((DRY_RUN)) && exit 0

# Without resolution nothing checked the host side: do it now, loudly.
"$PYTHON" - "$WHEELHOUSE/host-requirements.txt" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for line in open(sys.argv[1]):
    name, _, wanted = line.strip().partition("==")
    if not name:
        continue
    try:
        have = version(name)
    except PackageNotFoundError:
        missing.append(name)
        continue
    if have != wanted:
        print(f"WARNING: host has {name} {have}; the wheelhouse was resolved with {wanted}", file=sys.stderr)
if missing:
    sys.exit(f"ERROR: the host lacks {', '.join(missing)}, which the wheelhouse leaves out")
EOF
if ! "$PYTHON" -m pip check; then
    echo "WARNING: pip check found the conflicts above (expected with --no-deps when the host's torch is its own build)" >&2
fi
