"""A real MLflow UI in a real browser, for tests: `mlflow server` on a free loopback port and headless Chromium.

No Selenium: Chromium itself renders the React app (`--virtual-time-budget` lets its requests and timers run), then
writes the resulting DOM (`--dump-dom`) and a PNG (`--screenshot`). Every process gets an argument list, never a
shell string, binds or talks to 127.0.0.1 only, and is stopped when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags this workplace asks for: no sandbox (containers run as root), no GPU, nothing fetched from the network
# besides the page, a fresh profile per call.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow server` for `backend_uri` on 127.0.0.1; yields its base URL; stops it (and its workers) after."""
    port = free_port()
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "w")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}); see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer within {timeout:.0f} s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and the uvicorn worker it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def render(url: str, screenshot: Path | None = None, size: tuple[int, int] = (1600, 1000),
           budget_ms: int = 25_000, timeout: float = 180.0) -> str:
    """Load `url` in headless Chromium; return the DOM after `budget_ms` of page time, optionally save a PNG."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="sweep-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={budget_ms}", "--dump-dom"]
        if screenshot is not None:
            cmd.append(f"--screenshot={screenshot}")
        done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


_TOKEN = re.compile(r'<div[^>]*?role="(row|gridcell|columnheader)"[^>]*>')
_ATTR = re.compile(r'([\w-]+)="([^"]*)"')
_TAG = re.compile(r"<[^>]*>")


def runs_table(dom: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(row id -> {column id -> text}, column ids of the header, left to right) of the runs table (an ag-grid) in a
    dumped DOM.

    A cell's text is the text between its opening tag and the next row or cell. A row's id is its run id, or with the
    table grouped, `<group id>.<run id>` for a trial and the group id (such as `param.strategy.l1`) for a group row.
    """
    rows: dict[str, dict[str, str]] = {}
    headers: dict[str, int] = {}  # column id -> its place, left to right (the DOM holds pinned columns first)
    tokens = list(_TOKEN.finditer(dom))
    row = None
    for i, token in enumerate(tokens):
        attrs = dict(_ATTR.findall(token.group(0)))
        role = token.group(1)
        if role == "row":
            row = attrs.get("row-id")
            if row:
                rows.setdefault(row, {})
        elif role == "columnheader" and attrs.get("col-id") and attrs.get("aria-colindex"):
            headers.setdefault(html.unescape(attrs["col-id"]), int(attrs["aria-colindex"]))
        elif role == "gridcell" and row and attrs.get("col-id"):
            end = tokens[i + 1].start() if i + 1 < len(tokens) else len(dom)
            text = html.unescape(_TAG.sub(" ", dom[token.end():end]))
            rows[row][html.unescape(attrs["col-id"])] = " ".join(text.split())
    return rows, sorted(headers, key=headers.__getitem__)
