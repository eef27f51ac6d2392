"""A local stand-in for the Hugging Face Hub's HTTP API, enough for `create_repo` and `upload_folder`.

It listens on 127.0.0.1 on an ephemeral port, in a daemon thread, and stops by itself after a fixed
lifetime or a fixed number of requests, so a test that forgets it cannot leave it running. Point
huggingface_hub at it with ``HF_ENDPOINT=hub.url`` (a child process) or ``HfApi(endpoint=hub.url)``.

The routes are those huggingface_hub 2.4 calls (read from its hf_api.py / _commit_api.py):
- ``GET  /api/whoami-v2``                                   who owns the token
- ``POST /api/repos/create``                                create_repo (409 when it exists)
- ``POST /api/validate-yaml``                               the README.md metadata check
- ``POST /api/models/{repo}/branch/{branch}``               create_branch
- ``POST /api/models/{repo}/preupload/{revision}``          upload modes: always "regular" here, so the
                                                             file bytes travel base64-encoded in the commit
- ``POST /api/models/{repo}/commit/{revision}``             the NDJSON commit
- ``POST /api/models/{repo}/discussions`` and ``GET .../discussions/{num}``   pull requests
- ``GET  /api/models/{repo}/revision/{revision}``           repo_info
- ``GET  /api/agent-harnesses``                             a public registry huggingface_hub reads for its
                                                             user-agent header (answered empty, no token needed)
Every other route needs the token. Anything else answers 404 and is recorded in ``unexpected``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)
    pull_requests: list[dict] = field(default_factory=list)


class FakeHub:
    """The server and what it received. Use as a context manager (or call start() / stop())."""

    def __init__(self, token: str, user: str = "tester", role: str = "write", lifetime_s: float = 300.0,
                 max_requests: int = 500):
        self.token = token
        self.user = user
        self.role = role
        self.lifetime_s = lifetime_s
        self.max_requests = max_requests
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.unauthorized: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- what arrived ---------------------------------------------------------------------------

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``ref`` (a branch or ``refs/pr/N``), as the commits left them."""
        repo = self.repos.get(repo_id)
        return dict(repo.refs.get(ref, {})) if repo else {}

    def write_received(self, repo_id: str, target, ref: str = "main") -> None:
        """Write the received files of ``repo_id`` into the folder ``target`` (what a download would give)."""
        from pathlib import Path

        for path, content in self.files(repo_id, ref).items():
            destination = Path(target) / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(content)

    def commit_count(self) -> int:
        return sum(len(repo.commits) for repo in self.repos.values())


_REPO = r"(?P<repo>[^/]+/[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------------

    def _reply(self, status: int, document, headers: dict | None = None) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._reply(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("request body too large for the fake Hub")
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.fake.token}"

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        raw_path, query = parts.path, parse_qs(parts.query)
        with fake._lock:
            fake.requests.append((method, raw_path))
            too_many = len(fake.requests) > fake.max_requests
        try:
            body = self._body()
        except ValueError as exc:
            return self._error(413, str(exc))
        if too_many:
            return self._error(503, "the fake Hub's request budget is spent")
        for route_method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, raw_path)
            if match and route_method == method:
                if handler not in _PUBLIC and not self._authorized():
                    with fake._lock:
                        fake.unauthorized.append((method, raw_path))
                    return self._error(401, "Invalid credentials in Authorization header", "Unauthorized")
                arguments = {key: unquote(value) for key, value in match.groupdict().items()}
                with fake._lock:
                    return handler(self, body=body, query=query, **arguments)
        with fake._lock:
            fake.unexpected.append((method, raw_path))
        return self._error(404, f"the fake Hub does not serve {method} {raw_path}")

    def _repo(self, repo: str) -> FakeRepo | None:
        found = self.fake.repos.get(repo)
        if found is None:
            self._error(404, f"Repository {repo} not found", "RepoNotFound")
        return found

    # --- routes ---------------------------------------------------------------------------------

    def agent_harnesses(self, body, query):
        self._reply(200, {"standardEnvVars": [], "harnesses": {}})

    def whoami(self, body, query):
        self._reply(200, {"type": "user", "name": self.fake.user,
                          "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.fake.role}}})

    def create_repo(self, body, query):
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.fake.user}/{payload['name']}"
        if repo_id in self.fake.repos:  # the Hub's 409 still carries the url, which create_repo reads
            return self._reply(409, {"error": "You already created this model repo", "url": f"{self.fake.url}/{repo_id}"})
        self.fake.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        self._reply(200, {"url": f"{self.fake.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body, query):
        self._reply(200, {"errors": [], "warnings": []})

    def create_branch(self, body, query, repo, branch):
        found = self._repo(repo)
        if found is None:
            return
        if branch in found.refs:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        found.refs[branch] = dict(found.refs["main"])
        self._reply(200, {})

    def preupload(self, body, query, repo, revision):
        found = self._repo(repo)
        if found is None:
            return
        if revision not in found.refs and not (query.get("create_pr") and revision == "main"):
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = json.loads(body)["files"]
        self._reply(200, {"files": [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                    for item in files]})

    def commit(self, body, query, repo, revision):
        found = self._repo(repo)
        if found is None:
            return
        if revision not in found.refs:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        tree = dict(found.refs[revision])
        for line in lines:
            if line["key"] == "file":
                tree[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                tree.pop(line["value"]["path"], None)
            elif line["key"] != "header":
                return self._error(400, f"the fake Hub does not accept '{line['key']}' commit entries")
        found.refs[revision] = tree
        oid = hashlib.sha1(json.dumps([revision, len(found.commits), sorted(tree)]).encode()).hexdigest()
        found.commits.append({"revision": revision, "summary": header.get("summary"), "oid": oid,
                              "paths": sorted(line["value"]["path"] for line in lines if line["key"] == "file")})
        self._reply(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.fake.url}/{repo}/commit/{oid}",
                          "pullRequestUrl": None})

    def create_discussion(self, body, query, repo):
        found = self._repo(repo)
        if found is None:
            return
        payload = json.loads(body)
        number = len(found.pull_requests) + 1
        found.pull_requests.append({"num": number, "title": payload.get("title"), "pullRequest": payload.get("pullRequest")})
        found.refs[f"refs/pr/{number}"] = dict(found.refs["main"])
        self._reply(200, {"num": number, "url": f"{self.fake.url}/{repo}/discussions/{number}"})

    def discussion(self, body, query, repo, number):
        found = self._repo(repo)
        if found is None:
            return
        pull = found.pull_requests[int(number) - 1]
        self._reply(200, {"title": pull["title"], "num": pull["num"], "author": {"name": self.fake.user},
                          "createdAt": "2025-01-01T00:00:00.000Z", "status": "open",
                          "repo": {"name": repo, "type": "model"}, "isPullRequest": bool(pull["pullRequest"]),
                          "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})

    def repo_info(self, body, query, repo, revision):
        found = self._repo(repo)
        if found is None:
            return
        oid = found.commits[-1]["oid"] if found.commits else "0" * 40
        self._reply(200, {"id": repo, "sha": oid, "private": found.private,
                          "siblings": [{"rfilename": path} for path in sorted(found.refs.get(revision, {}))]})


_ROUTES = [
    ("GET", r"/api/agent-harnesses", _Handler.agent_harnesses),
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("POST", rf"/api/models/{_REPO}/discussions", _Handler.create_discussion),
    ("GET", rf"/api/models/{_REPO}/discussions/(?P<number>\d+)", _Handler.discussion),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.repo_info),
]
_PUBLIC = (_Handler.agent_harnesses,)
