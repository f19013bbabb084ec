"""A PEP 503 simple index over a directory of wheels, served on loopback: the build's TORCH_INDEX_URL on a
machine that cannot reach PyPI's or PyTorch's torch builds."""

from __future__ import annotations

import functools
import html
import http.server
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A fixed port keeps the TORCH_INDEX_URL build argument, and with it the build cache, the same between runs;
# any free port is taken when it is busy.
PREFERRED_PORT = 38471


def _project(wheel: Path) -> str:
    """The normalised project name of a wheel file (PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()


def write_index(wheels: Path, root: Path) -> None:
    """simple/<project>/index.html linking to the wheel files, under root."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise FileNotFoundError(f"no wheels in {wheels}")
    projects: dict[str, list[Path]] = {}
    for wheel in files:
        projects.setdefault(_project(wheel), []).append(wheel)
    simple = root / "simple"
    for project, project_wheels in projects.items():
        directory = simple / project
        directory.mkdir(parents=True, exist_ok=True)
        links = []
        for wheel in project_wheels:
            (directory / wheel.name).unlink(missing_ok=True)
            (directory / wheel.name).symlink_to(wheel)
            links.append(f'<a href="{html.escape(wheel.name)}">{html.escape(wheel.name)}</a><br>')
        (directory / "index.html").write_text("<!DOCTYPE html>\n" + "\n".join(links) + "\n", encoding="utf-8")
    index = [f'<a href="{p}/">{p}</a><br>' for p in sorted(projects)]
    (simple / "index.html").write_text("<!DOCTYPE html>\n" + "\n".join(index) + "\n", encoding="utf-8")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _server(root: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", PREFERRED_PORT), handler)
    except OSError:
        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)


@contextmanager
def serve(wheels: Path, root: Path) -> Iterator[str]:
    """Serve an index over the wheels on 127.0.0.1; yields its URL (…/simple)."""
    write_index(wheels, root)
    server = _server(root)
    thread = threading.Thread(target=server.serve_forever, name="wheel-index", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
