#!/usr/bin/env bash
# Build a wheelhouse for an air-gapped Python 3.12 x86_64 GPU worker: the quantdag
# wheel plus every dependency the host lacks. Packages the host image already has
# (infra/wheelhouse-exclude.txt: torch, triton, transformers, numpy, ...) stay out,
# together with whatever only they need. Needs PyPI (or a mirror) on THIS machine.
#
# Steps: build the project wheel -> build wheels of sdist-only dependencies -> let pip
# resolve the tree for the target (metadata only, nothing big downloaded) -> plan with
# infra/wheelhouse_plan.py -> download the planned wheels, hash-checked -> print size.
# The result is self-contained: copy the folder to the host and run its
# install_offline.sh.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: infra/build_wheelhouse.sh [options]
  -o, --out DIR          wheelhouse folder (default: infra/wheelhouse, git-ignored)
  --python-version X.Y   target Python (default: 3.12)
  --glibc X.Y            newest manylinux glibc the host has (default: 2.28; Ubuntu 22.04: 2.35)
  --exclude-file FILE    names/globs the host already has (default: infra/wheelhouse-exclude.txt)
  --exclude NAME         exclude one more name or glob (repeatable)
  --no-exclude           ship every dependency (a host without torch)
  --with-fla             include flash-linear-attention (the project's [gpu] extra)
  --list                 resolve and print what would go in; download nothing
  --dry-run              print the commands only; no network, nothing written
  -h, --help             this text
EOF
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
OUT="$HERE/wheelhouse"
PY_VERSION=3.12
GLIBC=2.28
EXCLUDE_FILE="$HERE/wheelhouse-exclude.txt"
EXCLUDES=()
EXTRAS=""
MODE=build
PYTHON="${PYTHON:-python3}"
# sdist-only dependencies and the pin to build a wheel of: omegaconf 2.3 (which
# modelopt accepts) requires antlr4-python3-runtime 4.9.*, published as sdist only.
SDIST_ONLY=("antlr4-python3-runtime==4.9.3")

while (($#)); do
    case "$1" in
        -o|--out) OUT="$2"; shift 2 ;;
        --python-version) PY_VERSION="$2"; shift 2 ;;
        --glibc) GLIBC="$2"; shift 2 ;;
        --exclude-file) EXCLUDE_FILE="$2"; shift 2 ;;
        --exclude) EXCLUDES+=("$2"); shift 2 ;;
        --no-exclude) EXCLUDE_FILE=""; shift ;;
        --with-fla) EXTRAS="[gpu]"; shift ;;
        --list) MODE=list; shift ;;
        --dry-run) MODE=dry-run; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

[[ "$PY_VERSION" =~ ^3\.[0-9]+$ ]] || { echo "--python-version must look like 3.12, got $PY_VERSION" >&2; exit 2; }
[[ "$GLIBC" =~ ^2\.([0-9]+)$ ]] || { echo "--glibc must look like 2.28, got $GLIBC" >&2; exit 2; }
GLIBC_MINOR="${BASH_REMATCH[1]}"
((GLIBC_MINOR >= 17)) || { echo "--glibc below 2.17 is not supported" >&2; exit 2; }
[[ -z "$EXCLUDE_FILE" || -f "$EXCLUDE_FILE" ]] || { echo "no exclude file $EXCLUDE_FILE" >&2; exit 2; }

# pip matches --platform literally (no expansion to older manylinux tags), so list
# every tag the host accepts: manylinux_2_5 .. manylinux_2_<GLIBC> and legacy aliases.
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
        --abi "cp${PY_VERSION/./}")
for ((m = GLIBC_MINOR; m >= 5; m--)); do TARGET+=(--platform "manylinux_2_${m}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

PLAN_ARGS=(--python-version "$PY_VERSION")
[[ -n "$EXCLUDE_FILE" ]] && PLAN_ARGS+=(--exclude-file "$EXCLUDE_FILE")
for e in "${EXCLUDES[@]}"; do PLAN_ARGS+=(--exclude "$e"); done

run() {  # print (to stderr), and run unless --dry-run
    { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
    [[ "$MODE" == dry-run ]] || "$@"
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOCAL="$WORK/local"   # wheels that no index serves: the project, built sdists
mkdir -p "$LOCAL" "$WORK/src"

# 1. The project wheel, built from a copy so no build/ or *.egg-info lands in the tree.
#    The copy holds what git tracks or would track (untracked, not ignored).
if [[ "$MODE" == dry-run ]]; then
    echo "+ (copy the files git lists in $REPO to $WORK/src)" >&2
elif git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard \
        | (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
        | tar -C "$REPO" --null -T - -cf - | tar -C "$WORK/src" -xf -
else
    cp -a "$REPO/." "$WORK/src/"
fi
run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$LOCAL" "$WORK/src"

# 2. Wheels of sdist-only dependencies (pure Python, so one wheel serves any host).
run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$LOCAL" "${SDIST_ONLY[@]}"

# 3. Resolve for the target host. pip accepts --platform only with --target; with
#    --dry-run it reads metadata only and writes nothing there.
PROJECT_WHEEL="$LOCAL/quantdag-*.whl"
if [[ "$MODE" != dry-run ]]; then
    PROJECT_WHEEL="$(ls "$LOCAL"/quantdag-*.whl)"
fi
run "$PYTHON" -m pip install --dry-run --target "$WORK/target" --quiet --report "$WORK/report.json" \
    "${TARGET[@]}" --find-links "$LOCAL" "quantdag${EXTRAS} @ file://$PROJECT_WHEEL"

# 4. Plan: what goes in, what the host must already have.
if [[ "$MODE" == list ]]; then
    run "$PYTHON" "$HERE/wheelhouse_plan.py" "$WORK/report.json" "${PLAN_ARGS[@]}"
    exit 0
fi
run "$PYTHON" "$HERE/wheelhouse_plan.py" "$WORK/report.json" "${PLAN_ARGS[@]}" --out "$WORK/plan" >/dev/null

# 5. Fill the wheelhouse: index wheels by hash, local ones hash-checked and copied.
run mkdir -p "$OUT"
run "$PYTHON" -m pip download --no-deps --require-hashes "${TARGET[@]}" \
    --dest "$OUT" --requirement "$WORK/plan/download.txt"
if [[ "$MODE" == dry-run ]]; then
    echo "+ (sha256sum -c the plan's local.txt, copy those wheels to $OUT)" >&2
else
    sha256sum --check --quiet "$WORK/plan/local.txt"
    cut -d' ' -f3- "$WORK/plan/local.txt" | while IFS= read -r wheel; do cp "$wheel" "$OUT/"; done
fi
run cp "$WORK/plan/requirements.txt" "$WORK/plan/host-requirements.txt" "$HERE/install_offline.sh" "$OUT/"

[[ "$MODE" == dry-run ]] && exit 0
echo "wheelhouse: $OUT"
echo "  $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
echo "  the host must already have: $(tr '\n' ' ' < "$OUT/host-requirements.txt")"
