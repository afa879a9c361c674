"""Decide what an offline wheelhouse holds, from pip's resolution report.

build_wheelhouse.sh has pip resolve the whole tree for the target host
(``pip install --dry-run --report``, metadata only). This module keeps the packages
reachable from the requested root WITHOUT passing through an excluded one (what the
GPU host already has: torch, triton, transformers, ...). torch's CUDA wheels therefore
drop out, while a package that something kept also needs (filelock, fsspec) stays.

    python infra/wheelhouse_plan.py REPORT --exclude-file F [--exclude NAME]... --out DIR

writes into DIR:
  download.txt           ``name==version --hash=sha256:...`` for ``pip download``
  local.txt              ``sha256  path`` (sha256sum -c format) of wheels found on local disk:
                         the project wheel, wheels built from sdists, a local index mirror
  host-requirements.txt  ``name==version`` of excluded packages the kept ones need
  requirements.txt       the root requirement, for ``pip install -r`` on the host
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # an interpreter with pip but without packaging: use pip's copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


@dataclass(frozen=True)
class Dist:
    """One resolved distribution of the report."""

    name: str                 # canonical name
    version: str
    requires: tuple[str, ...]
    url: str
    sha256: str | None
    requested_extras: tuple[str, ...] = ()
    requested: bool = False

    @property
    def is_local(self) -> bool:
        return self.url.startswith("file:")

    def pin(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass
class Plan:
    keep: list[Dist] = field(default_factory=list)   # goes into the wheelhouse
    host: list[Dist] = field(default_factory=list)   # excluded, and needed by something kept


def target_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython ``python_version`` Linux x86_64 host."""
    env = default_environment()
    env.update(
        python_version=python_version, python_full_version=f"{python_version}.0",
        implementation_name="cpython", platform_python_implementation="CPython",
        implementation_version=f"{python_version}.0",
        os_name="posix", sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
    )
    return env


def load_report(path: Path) -> dict[str, Dist]:
    """Distributions of a ``pip install --report`` file, by canonical name."""
    report = json.loads(path.read_text())
    dists = {}
    for item in report["install"]:
        meta, info = item["metadata"], item["download_info"]
        hashes = info.get("archive_info", {}).get("hashes", {})
        name = canonicalize_name(meta["name"])
        dists[name] = Dist(
            name=name, version=meta["version"], requires=tuple(meta.get("requires_dist") or ()),
            url=info["url"], sha256=hashes.get("sha256"),
            requested_extras=tuple(item.get("requested_extras") or ()), requested=item.get("requested", False),
        )
    return dists


def is_excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, canonicalize_name(p)) for p in patterns)


def make_plan(dists: dict[str, Dist], excludes: list[str], env: dict[str, str]) -> Plan:
    """Walk from the requested roots; stop at excluded packages.

    Raises:
        ValueError: no requested root, or a root is itself excluded.
        RuntimeError: a requirement that applies on the target is missing from the report
            (the report and the requirement metadata disagree).
    """
    roots = [d for d in dists.values() if d.requested]
    if not roots:
        raise ValueError("the report has no requested distribution (the root to install)")
    bad_roots = [d.name for d in roots if is_excluded(d.name, excludes)]
    if bad_roots:
        raise ValueError(f"requested roots are excluded: {bad_roots}")
    seen: set[tuple[str, frozenset[str]]] = set()
    keep: dict[str, Dist] = {}
    host: dict[str, Dist] = {}
    missing: list[str] = []
    stack = [(d, frozenset(d.requested_extras)) for d in roots]
    while stack:
        dist, extras = stack.pop()
        if (dist.name, extras) in seen:
            continue
        seen.add((dist.name, extras))
        keep[dist.name] = dist
        for line in dist.requires:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
                continue
            name = canonicalize_name(req.name)
            if name not in dists:
                missing.append(f"{dist.pin()} needs {line}")
            elif is_excluded(name, excludes):
                host[name] = dists[name]
            else:
                stack.append((dists[name], frozenset(req.extras)))
    if missing:
        raise RuntimeError("requirements missing from the resolution report:\n  " + "\n  ".join(missing))
    return Plan(keep=sorted(keep.values(), key=lambda d: d.name),
                host=sorted(host.values(), key=lambda d: d.name))


def read_patterns(path: Path | None, extra: list[str]) -> list[str]:
    lines = path.read_text().splitlines() if path else []
    patterns = [ln.split("#", 1)[0].strip() for ln in lines]
    return [p for p in patterns if p] + list(extra)


def write_plan(plan: Plan, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = [d for d in plan.keep if not d.is_local]
    unhashed = [d.pin() for d in plan.keep if not d.sha256]
    if unhashed:
        raise RuntimeError(f"the index gave no sha256 for: {unhashed}")
    (out / "download.txt").write_text("".join(f"{d.pin()} --hash=sha256:{d.sha256}\n" for d in index))
    (out / "local.txt").write_text(
        "".join(f"{d.sha256}  {unquote(urlparse(d.url).path)}\n" for d in plan.keep if d.is_local))
    (out / "host-requirements.txt").write_text("".join(d.pin() + "\n" for d in plan.host))
    roots = [d for d in plan.keep if d.requested]
    (out / "requirements.txt").write_text("".join(
        f"{d.name}[{','.join(d.requested_extras)}]=={d.version}\n" if d.requested_extras else d.pin() + "\n"
        for d in roots))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="pip install --dry-run --report output")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--exclude-file", type=Path, help="one name or glob a line (# comments)")
    parser.add_argument("--exclude", action="append", default=[], help="another name or glob")
    parser.add_argument("--out", type=Path, help="write the plan files here")
    args = parser.parse_args(argv)

    patterns = read_patterns(args.exclude_file, args.exclude)
    plan = make_plan(load_report(args.report), patterns, target_environment(args.python_version))
    for d in plan.keep:
        print(f"wheelhouse  {d.pin()}{'  (local)' if d.is_local else ''}")
    for d in plan.host:
        print(f"host        {d.pin()}")
    print(f"{len(plan.keep)} in the wheelhouse, {len(plan.host)} expected on the host", file=sys.stderr)
    if args.out:
        write_plan(plan, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
