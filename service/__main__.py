"""`python -m service`: run the API with uvicorn. Flags override DIGIT_* environment variables."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from service.config import Settings, unknown_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve the digit model over HTTP. Every setting is also read from DIGIT_* environment variables.",
    )
    parser.add_argument("--host", help="interface to listen on (default: DIGIT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: DIGIT_PORT or 8000)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)  # noqa: T201 - before logging exists
        return 2

    from service.auth import read_tokens
    from service.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    for warning in unknown_settings(os.environ):
        logging.getLogger("service").warning("%s", warning)
    settings = settings.for_workers()
    try:  # fail here, once, not in every worker
        read_tokens(settings.api_tokens, settings.api_tokens_file)
        read_tokens(settings.admin_tokens, settings.admin_tokens_file)
    except ValueError as exc:  # e.g. a token file that cannot be read
        print(f"invalid settings: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if settings.workers > 1:
        from service.workers import Supervisor

        return Supervisor(settings, settings.workers).run()

    from service.app import create_app
    from service.server import build_server

    app = create_app(settings)
    server = build_server(app, settings)
    server.run()
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's convention); the log says why


if __name__ == "__main__":
    sys.exit(main())
