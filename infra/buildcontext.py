"""What ``docker build`` would see, checked without a Docker engine.

``context_files`` applies ``.dockerignore`` with Docker's matching rules to list the
files a build from the repository root sends; ``dockerfile_problems`` checks a
Dockerfile against that context. Used by infra/validate.py and tests/infra.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class DockerIgnore:
    """``.dockerignore`` matching as Docker's patternmatcher does it: patterns in order,
    the last match wins, ``!`` re-includes, and a path is matched when it or any of
    its parent folders matches (``*`` stays within a folder, ``**`` crosses them)."""

    def __init__(self, text: str):
        self.patterns: list[tuple[re.Pattern[str], bool, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            cleaned = line.lstrip("!").strip().strip("/")
            cleaned = re.sub(r"/+", "/", cleaned.removeprefix("./"))
            self.patterns.append((re.compile(self._regex(cleaned)), negated, cleaned))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            ch = pattern[i]
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
                continue
            if pattern.startswith("**", i):
                out, i = out + ".*", i + 2
                continue
            if ch == "\\" and i + 1 < len(pattern):
                out, i = out + re.escape(pattern[i + 1]), i + 2
                continue
            out += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
            i += 1
        return out + "$"

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        matched = False
        for regex, negated, _ in self.patterns:
            if any(regex.match(c) for c in candidates):
                matched = not negated
        return matched

    def may_include_below(self, rel_dir: str) -> bool:
        """Whether some ``!`` pattern could re-include a path under an excluded folder."""
        return any(neg and (text.startswith(rel_dir + "/") or text.startswith("*"))
                   for _, neg, text in self.patterns)


def context_files(root: Path = REPO) -> list[str]:
    """Files (relative paths) that ``docker build root`` sends, after .dockerignore."""
    ignore_file = root / ".dockerignore"
    ignore = DockerIgnore(ignore_file.read_text() if ignore_file.exists() else "")
    files = []
    for path in sorted(root.iterdir()):
        files += _walk(root, path, ignore)
    return files


def _walk(root: Path, path: Path, ignore: DockerIgnore) -> list[str]:
    rel = path.relative_to(root).as_posix()
    if path.is_dir() and not path.is_symlink():
        if ignore.excluded(rel) and not ignore.may_include_below(rel):
            return []
        return [f for child in sorted(path.iterdir()) for f in _walk(root, child, ignore)]
    return [] if ignore.excluded(rel) else [rel]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _strip_flags(args: str) -> tuple[list[str], str]:
    flags = []
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        flags.append(flag)
        args = args.lstrip()
    return flags, args


def dockerfile_problems(dockerfile: Path, root: Path = REPO) -> list[str]:
    """COPY sources present in the context, RUN lines parse as sh, python -c compiles,
    and the final user is not root."""
    problems, files, user = [], context_files(root), "root"
    for keyword, args in dockerfile_instructions(dockerfile.read_text()):
        flags, args = _strip_flags(args)
        if keyword in ("COPY", "ADD") and not any(f.startswith("--from") for f in flags):
            sources = json.loads(args)[:-1] if args.startswith("[") else shlex.split(args)[:-1]
            for src in sources:
                src = src.strip("/").removeprefix("./")
                if src in ("", "."):
                    present = bool(files)
                else:
                    present = any(f == src or f.startswith(src + "/") or fnmatch.fnmatch(f, src) for f in files)
                if not present:
                    problems.append(f"{keyword} source {src or '.'!r} is not in the build context")
        elif keyword == "RUN":
            check = _run_shell_check(args)
            if check:
                problems.append(check)
        elif keyword == "USER":
            user = args.split(":")[0]
    if user in ("root", "0"):
        problems.append("the image runs as root (no USER after the last RUN)")
    return problems


def _run_shell_check(command: str) -> str | None:
    result = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True)
    if result.returncode:
        return f"RUN does not parse as sh: {result.stderr.strip()}"
    tokens = shlex.split(command)
    for i, token in enumerate(tokens[:-2]):
        if re.fullmatch(r"python[0-9.]*", token) and tokens[i + 1] == "-c":
            try:
                compile(tokens[i + 2], "<RUN python -c>", "exec")
            except SyntaxError as err:
                return f"RUN python -c does not compile: {err}"
    return None
