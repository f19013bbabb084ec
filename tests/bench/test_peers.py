"""The bench's correctness check waits out a server that is still working off an overload."""

from __future__ import annotations

import http.server
import threading
import urllib.error
from collections.abc import Iterator

import pytest

from bench import peers


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Refuses the first `refusals` requests with `status`, then answers digit 7."""

    refusals = 0
    status = 429

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        if cls.refusals > 0:
            cls.refusals -= 1
            self.send_response(cls.status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"digit": 7}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("status", [429, 503])
def test_a_refusal_is_waited_out(server: str, status: int) -> None:
    _Refusing.refusals, _Refusing.status = 2, status
    assert peers.predicted_digit(server, b"png") == 7


def test_refusals_that_never_end_and_other_errors_are_raised(server: str) -> None:
    _Refusing.refusals, _Refusing.status = 10, 429
    with pytest.raises(urllib.error.HTTPError) as refused:
        peers.predicted_digit(server, b"png")
    assert refused.value.code == 429
    refused.value.close()
    _Refusing.refusals, _Refusing.status = 1, 500
    with pytest.raises(urllib.error.HTTPError) as failed:
        peers.predicted_digit(server, b"png")
    assert failed.value.code == 500
    failed.value.close()
