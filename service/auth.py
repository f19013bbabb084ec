"""Optional bearer-token access control: one token set for prediction routes, one for admin routes.

Tokens come from settings or from a file (one per line, e.g. a mounted Kubernetes Secret) and
are compared in constant time. An empty set means the routes are open (the local demo).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from service.errors import ServiceError
from service.state import State


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


def read_tokens(inline: Iterable[str], file: Path | None) -> frozenset[str]:
    """The configured tokens; a token file that cannot be read stops start-up."""
    tokens = {token.strip() for token in inline if token.strip()}
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read token file {file}: {exc.strerror}") from None
        tokens |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    return frozenset(tokens)


class TokenCheck:
    def __init__(self, tokens: Iterable[str], realm: str) -> None:
        self._tokens = [token.encode() for token in tokens]
        self.realm = realm

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def verify(self, authorization: str | None) -> None:
        """Raise Unauthorized unless the header carries one of the tokens (or none are configured)."""
        if not self._tokens:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized(
                f"this route needs a bearer token: send 'Authorization: Bearer <token>' ({self.realm})",
                headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'},
            )
        candidate = presented.strip().encode()
        matched = False
        for token in self._tokens:  # compare with every token: timing says nothing about which
            matched |= hmac.compare_digest(candidate, token)
        if not matched:
            raise Unauthorized(
                f"the bearer token is not valid ({self.realm})",
                headers={"WWW-Authenticate": f'Bearer realm="{self.realm}", error="invalid_token"'},
            )


async def require_admin_token(request: Request, state: State) -> None:
    state.admin_auth.verify(request.headers.get("authorization"))
