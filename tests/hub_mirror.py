"""A local stand-in for the Hugging Face Hub API, for ``HF_ENDPOINT``.

Answers the three endpoints the watcher uses, in the Hub's JSON shapes:

- ``GET /api/models/{owner}/{name}/revision/{rev}``: model info with the revision's commit ``sha``
- ``GET /api/models/{owner}/{name}``: the same for ``main``
- ``GET /api/models?author=...&search=...``: listing; ``search`` is a case-insensitive substring

State is plain dicts the test changes between calls: ``repos[repo][branch] = sha``, and
``failing[repo_or_author] = status`` to answer with an error (500, 429, ...). Every request is
recorded in ``requests`` (path, query, Authorization header).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class HubMirror:
    """Controllable fake Hub. Use :meth:`start` / :meth:`stop`, or as a context manager."""

    repos: dict[str, dict[str, str]] = field(default_factory=dict)
    failing: dict[str, int] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def set_sha(self, repo: str, sha: str, branch: str = "main") -> None:
        """Point ``branch`` of ``repo`` at ``sha`` (creating the repo)."""
        self.repos.setdefault(repo, {})[branch] = sha

    def start(self) -> HubMirror:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                status, body = mirror.answer(self.path, self.headers.get("Authorization"))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if status == 404:
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> HubMirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, raw_path: str, authorization: str | None) -> tuple[int, Any]:
        """Status and JSON body for one GET."""
        split = urlsplit(raw_path)
        query = parse_qs(split.query)
        self.requests.append({"path": split.path, "query": query, "authorization": authorization})
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        if parts[:2] != ["api", "models"]:
            return 404, {"error": f"no route {split.path}"}
        if len(parts) == 2:
            return self._listing(query)
        if len(parts) in (4, 6) and (len(parts) == 4 or parts[4] == "revision"):
            return self._info(f"{parts[2]}/{parts[3]}", parts[5] if len(parts) == 6 else "main")
        return 404, {"error": f"no route {split.path}"}

    def _info(self, repo: str, revision: str) -> tuple[int, Any]:
        if repo in self.failing:
            return self.failing[repo], {"error": f"mirror told to fail {repo}"}
        branches = self.repos.get(repo)
        if branches is None:
            return 404, {"error": "Repository not found"}
        sha = branches.get(revision) or (revision if revision in branches.values() else None)
        if sha is None:
            return 404, {"error": f"Invalid rev id: {revision}"}
        return 200, {"_id": sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                     "private": False, "disabled": False, "gated": False, "tags": [], "siblings": [],
                     "lastModified": "2026-11-30T00:00:00.000Z", "createdAt": "2026-11-01T00:00:00.000Z"}

    def _listing(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        author = (query.get("author") or [None])[0]
        if author in self.failing:
            return self.failing[author], {"error": f"mirror told to fail listing of {author}"}
        searches = [s.lower() for s in query.get("search", [])]
        rows = []
        for repo in sorted(self.repos):
            if author and repo.split("/")[0].lower() != author.lower():
                continue
            if any(s not in repo.lower() for s in searches):
                continue
            rows.append({"_id": repo, "id": repo, "modelId": repo, "likes": 0, "downloads": 0, "private": False,
                         "tags": [], "createdAt": "2026-11-01T00:00:00.000Z"})
        return 200, rows


@contextmanager
def serve_mirror(monkeypatch: Any) -> Iterator[HubMirror]:
    """A started :class:`HubMirror` as ``HF_ENDPOINT``, with offline mode off and no ambient ``HF_TOKEN``.

    ``tests/conftest.py`` sets ``HF_HUB_OFFLINE=1`` for the session; huggingface_hub reads it once at
    import, so the module constant is patched rather than the environment.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubMirror() as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        yield mirror
