"""infra/build_wheelhouse.sh, infra/wheelhouse_plan.py and infra/install_offline.sh.

Fast and offline: the build script's --dry-run, the planning logic on a synthetic pip
report, and the installer against a tiny wheelhouse of generated wheels in a fresh
venv. One test (marked slow) resolves the real tree against PyPI (--list, metadata
only, 20-70 s); it skips when PyPI cannot be reached.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"
BUILD = INFRA / "build_wheelhouse.sh"
INSTALL = INFRA / "install_offline.sh"


def _build(*args, **kwargs):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True, env=env, **kwargs)


# ---------------------------------------------------------------- build script, no network

def test_dry_run_targets_python_312_manylinux_binaries():
    existed = (INFRA / "wheelhouse").exists()
    result = _build("--dry-run", timeout=30)
    assert result.returncode == 0, result.stderr
    commands = result.stderr
    resolve = next(ln for ln in commands.splitlines() if "install --dry-run" in ln)
    for flag in ("--only-binary=:all:", "--python-version 3.12", "--abi cp312",
                 "--platform manylinux_2_28_x86_64", "--platform manylinux_2_17_x86_64",
                 "--platform manylinux2014_x86_64", "--report"):
        assert flag in resolve, f"{flag} missing from: {resolve}"
    assert "manylinux_2_29" not in resolve
    assert "quantdag\\ @" in resolve and "quantdag\\[gpu\\]" not in resolve
    assert "pip wheel --no-deps" in commands and "antlr4-python3-runtime==4.9.3" in commands
    assert "--exclude-file " + str(INFRA / "wheelhouse-exclude.txt") in commands
    assert "download --no-deps --require-hashes" in commands
    assert (INFRA / "wheelhouse").exists() == existed, "--dry-run created the wheelhouse folder"


def test_dry_run_options_change_the_commands():
    out = _build("--dry-run", "--with-fla", "--glibc", "2.35", "--no-exclude", "--exclude", "scipy",
                 timeout=30).stderr
    assert "quantdag\\[gpu\\]" in out
    assert "--platform manylinux_2_35_x86_64" in out
    assert "--exclude-file" not in out and "--exclude scipy" in out


@pytest.mark.parametrize("args", [["--bogus"], ["--glibc", "2.5"], ["--python-version", "312"]])
def test_bad_options_are_refused(args):
    result = _build("--dry-run", *args, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr


def test_exclude_list_names_the_gpu_host_packages_only(wheelhouse_plan):
    patterns = wheelhouse_plan.read_patterns(INFRA / "wheelhouse-exclude.txt", [])
    for name in ("torch", "torchvision", "triton", "transformers", "numpy"):
        assert wheelhouse_plan.is_excluded(name, patterns), name
    for name in ("nvidia-modelopt", "nvidia-ml-py", "prefect", "mlflow", "flash-linear-attention"):
        assert not wheelhouse_plan.is_excluded(name, patterns), f"{name} would be left out"


# ---------------------------------------------------------------- planning logic

def _item(name, version, requires=(), requested=False, extras=None, url=None):
    return {
        "metadata": {"name": name, "version": version, "requires_dist": list(requires)},
        "download_info": {"url": url or f"https://files.example/{name}-{version}-py3-none-any.whl",
                          "archive_info": {"hashes": {"sha256": hashlib.sha256(name.encode()).hexdigest()}}},
        "requested": requested, "requested_extras": extras,
    }


@pytest.fixture
def report(tmp_path):
    items = [
        _item("quantdag", "0.1.0", ["torch>=2.9", "huggingface_hub>=1.0", "Prefect", "fla; extra == 'gpu'",
                                    "colorama; sys_platform == 'win32'", "tomli; python_version < '3.11'"],
              requested=True, extras=["gpu"], url="file:///build/quantdag-0.1.0-py3-none-any.whl"),
        _item("torch", "2.14.1", ["nvidia-cublas", "filelock", "sympy"]),
        _item("nvidia-cublas", "13.1"), _item("sympy", "1.14"), _item("filelock", "4.3"),
        _item("huggingface-hub", "1.33", ["filelock"]),
        _item("prefect", "3.9.1", ["httpx[http2]"]),
        _item("httpx", "0.28", ["h2; extra == 'http2'", "brotli; extra == 'brotli'"]),
        _item("h2", "4.4"), _item("fla", "0.6", ["torch"]),
    ]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"install": items}))
    return path


def _plan(wheelhouse_plan, report, excludes=("torch",)):
    dists = wheelhouse_plan.load_report(report)
    return wheelhouse_plan.make_plan(dists, list(excludes), wheelhouse_plan.target_environment("3.12"))


def test_plan_stops_at_excluded_packages_but_keeps_shared_ones(wheelhouse_plan, report):
    plan = _plan(wheelhouse_plan, report)
    assert [d.name for d in plan.keep] == ["filelock", "fla", "h2", "httpx", "huggingface-hub", "prefect", "quantdag"]
    assert [d.pin() for d in plan.host] == ["torch==2.14.1"]


def test_plan_without_the_extra_leaves_fla_out(wheelhouse_plan, report):
    data = json.loads(report.read_text())
    data["install"][0]["requested_extras"] = None
    report.write_text(json.dumps(data))
    assert "fla" not in [d.name for d in _plan(wheelhouse_plan, report).keep]


def test_plan_refuses_an_inconsistent_report(wheelhouse_plan, report):
    data = json.loads(report.read_text())
    data["install"] = [i for i in data["install"] if i["metadata"]["name"] != "filelock"]
    report.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="huggingface-hub==1.33 needs filelock"):
        _plan(wheelhouse_plan, report)
    with pytest.raises(ValueError, match="quantdag"):
        _plan(wheelhouse_plan, report, excludes=("quant*",))


def test_plan_files(wheelhouse_plan, report, tmp_path):
    wheelhouse_plan.write_plan(_plan(wheelhouse_plan, report), tmp_path / "plan")
    download = (tmp_path / "plan" / "download.txt").read_text().splitlines()
    assert all(" --hash=sha256:" in ln for ln in download) and len(download) == 6
    assert (tmp_path / "plan" / "local.txt").read_text().endswith("  /build/quantdag-0.1.0-py3-none-any.whl\n")
    assert (tmp_path / "plan" / "requirements.txt").read_text() == "quantdag[gpu]==0.1.0\n"
    assert (tmp_path / "plan" / "host-requirements.txt").read_text() == "torch==2.14.1\n"


# ---------------------------------------------------------------- installer, offline

def _wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal valid pure-Python wheel with one module."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": b"",
        f"{dist_info}/METADATA": "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                            *[f"Requires-Dist: {r}" for r in requires], ""]).encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()) + f"{dist_info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name_in_zip, data in files.items():
            zf.writestr(name_in_zip, data)
        zf.writestr(f"{dist_info}/RECORD", record)
    return path


@pytest.fixture(scope="module")
def offline_host(tmp_path_factory):
    """A wheelhouse {app -> dep, needs hostpkg>=1.0 from the host} and a fresh venv."""
    root = tmp_path_factory.mktemp("offline")
    house, extra = root / "wheelhouse", root / "host-wheels"
    house.mkdir()
    extra.mkdir()
    _wheel(house, "app", "0.1", ["dep", "hostpkg>=1.0"])
    _wheel(house, "dep", "2.0")
    (house / "requirements.txt").write_text("app==0.1\n")
    (house / "host-requirements.txt").write_text("hostpkg==1.0\n")
    _wheel(extra, "hostpkg", "0.9")
    # A venv that borrows pip from the base interpreter: seconds, where ensurepip takes 10+.
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "ensurepip", "--default-pip"], check=True, capture_output=True)
    return house, extra, python


def _install(house, python, *args):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(INSTALL), "--python", str(python), *args, str(house)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_installer_dry_run_never_uses_an_index(offline_host):
    house, _, python = offline_host
    out = _install(house, python, "--dry-run").stdout
    assert "--no-index --find-links" in out and "requirements.txt" in out
    out = _install(house, python, "--dry-run", "--no-deps").stdout
    assert "--no-index --no-deps" in out


def test_installer_modes_on_a_host_without_and_with_the_host_package(offline_host):
    house, extra, python = offline_host
    plain = _install(house, python)
    assert plain.returncode != 0 and "hostpkg" in plain.stderr, plain.stderr[-1500:]

    no_deps = _install(house, python, "--no-deps")
    assert no_deps.returncode != 0 and "the host lacks hostpkg" in no_deps.stderr, no_deps.stderr[-1500:]

    subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--quiet",
                    str(extra / "hostpkg-0.9-py3-none-any.whl")], check=True)
    no_deps = _install(house, python, "--no-deps")
    assert no_deps.returncode == 0, no_deps.stderr[-1500:]
    assert "WARNING: host has hostpkg 0.9" in no_deps.stderr
    assert "WARNING: pip check" in no_deps.stderr
    # the default mode still refuses a host package that does not satisfy the pins
    assert _install(house, python).returncode != 0


# ---------------------------------------------------------------- real resolution, PyPI

def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5)
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is not reachable")
def test_list_resolves_the_real_tree_for_the_gpu_host():
    result = _build("--list", "--with-fla", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    keep = {ln.split()[1].split("==")[0] for ln in result.stdout.splitlines() if ln.startswith("wheelhouse")}
    host = {ln.split()[1].split("==")[0] for ln in result.stdout.splitlines() if ln.startswith("host")}
    assert {"quantdag", "prefect", "mlflow", "nvidia-modelopt", "s3fs", "flash-linear-attention"} <= keep
    assert {"torch", "transformers"} <= host
    cuda_wheels = {n for n in keep if n.startswith(("nvidia-", "cuda-"))} - {"nvidia-modelopt", "nvidia-ml-py"}
    leaked = sorted(cuda_wheels | {n for n in keep if n.startswith(("torch", "triton")) or n == "sympy"})
    assert not leaked, f"host packages (or their CUDA wheels) in the wheelhouse: {leaked}"
