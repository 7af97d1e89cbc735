"""Serve a built viewer site on loopback over http: `autoexplain view --serve --site DIR`.

The site itself needs no server (open `index.html` from disk), but a browser does not follow a
`file://` link from an http page such as the Prefect UI. A server started here writes
`<site>/.serve.json` (its URL and process id) while it runs, so that a report can say where the
site is being served; `running_url(site)` believes that file only when the server at its URL answers
with the same file, i.e. is alive and serves this very folder.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from autoexplain import files
from autoexplain.errors import UserError

DEFAULT_PORT = 8765
STATE = ".serve.json"


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # quiet: the command prints its URL once, not one line per file

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")  # a rebuilt site shows at once
        super().end_headers()


@dataclass
class SiteServer:
    """A running server: `url` (ends with '/'), `close()` to stop it and remove its state file."""

    site: Path
    url: str
    httpd: ThreadingHTTPServer
    thread: threading.Thread
    state: dict = field(default_factory=dict)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        path = self.site / STATE
        try:
            if json.loads(path.read_text()) == self.state:  # not a later server's file
                path.unlink()
        except (OSError, ValueError):
            pass

    def wait(self) -> None:
        """Serve until Ctrl-C or SIGTERM, then close."""
        def stop(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
        try:
            self.thread.join()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def __enter__(self) -> "SiteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_address(host: str, port: int | None) -> None:
    """A UserError for a port that is no port number or a host this machine cannot resolve: found
    before the site is built, and named as what it is, not as a taken port."""
    import socket

    if port is not None and not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number", "pass one from 1 to 65535, or 0 for any free port")
    try:
        if host:  # "" is every interface, as 0.0.0.0
            socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host} is not an address of this machine ({e})",
                        "pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None


def _bind(site: Path, host: str, port: int) -> ThreadingHTTPServer:
    handler = functools.partial(_Handler, directory=str(site))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot serve on {host}:{port}: {e.strerror}", "pass --host 127.0.0.1 or an address of "
                            "this machine") from None
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}",
                        "pass another --port, or --port 0 for any free port") from None


def start(site: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None) -> SiteServer:
    """Serve `site` (a folder with index.html) in a background thread. port None: DEFAULT_PORT, or a
    free port when that one is taken; 0: any free port; another number: that port or a UserError."""
    check_address(host, port)
    site = Path(site).expanduser().resolve()
    if not (site / "index.html").is_file():
        raise UserError(f"{site} is not a viewer site (no index.html there)",
                        "build it first: autoexplain view --scores <scores folder> --site " + str(site))
    if port is None:
        try:
            httpd = _bind(site, host, DEFAULT_PORT)
        except UserError:
            httpd = _bind(site, host, 0)
    else:
        httpd = _bind(site, host, port)
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    url = f"http://{shown}:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, name="autoexplain-serve", daemon=True)
    thread.start()
    state = {"url": url, "pid": os.getpid(), "site": str(site)}
    try:
        files.write_text(site / STATE, json.dumps(state))
    except OSError:
        state = {}  # a read-only site is still served; it just cannot be found by running_url
    return SiteServer(site, url, httpd, thread, state)


def running_url(site: str | os.PathLike, timeout: float = 1.0) -> str | None:
    """The URL of a server started by `start` that is serving the folder `site` now, else None: the
    state file must name this folder, and the server at its URL must answer with that same file."""
    site = Path(site).expanduser().resolve()
    try:
        state = json.loads((site / STATE).read_text())
        url = state["url"]
        if state["site"] != str(site) or not url.startswith("http://"):
            return None  # a state file copied along with the site names the folder it was served from
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with opener.open(url + STATE, timeout=timeout) as r:
            return url if json.loads(r.read()) == state else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
