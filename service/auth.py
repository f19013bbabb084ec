"""Bearer-token access control as FastAPI security dependencies (shown in the OpenAPI document).

Prediction routes: open when no API tokens are configured (the local demo), else a valid
token is required. Admin routes (reload, and /metrics when so configured): closed unless
admin tokens are configured; an admin route with no token to check is refused, not opened.
Tokens come from settings or from a file (one per line, e.g. a mounted Kubernetes Secret)
and are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


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

    def verify(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise Unauthorized unless the credentials carry one of the tokens."""
        if credentials is None or not credentials.credentials.strip():
            raise Unauthorized(
                f"this route needs a bearer token: send 'Authorization: Bearer <token>' ({self.realm})",
                headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'},
            )
        candidate = credentials.credentials.strip().encode()
        matched = False
        for token in self._tokens:  # compare with every token: timing says nothing about which
            matched |= hmac.compare_digest(candidate, token)
        if not matched:
            raise Unauthorized(
                f"the bearer token is not valid ({self.realm})",
                headers={"WWW-Authenticate": f'Bearer realm="{self.realm}", error="invalid_token"'},
            )


# auto_error=False: a missing or malformed header reaches our check, which answers in our error format.
api_bearer = HTTPBearer(
    scheme_name="api_token", description="needed when the service has API tokens configured", auto_error=False
)
_admin_bearer = HTTPBearer(scheme_name="admin_token", description="admin routes need an admin token", auto_error=False)

Credentials = HTTPAuthorizationCredentials | None


async def check_api_token(request: Request) -> None:
    """401 unless the request carries an API token, when tokens are configured (else nothing is read)."""
    check: TokenCheck = request.app.state.api_auth
    if check.enabled:
        check.verify(await api_bearer(request))


async def require_admin_token(request: Request, credentials: Annotated[Credentials, Depends(_admin_bearer)]) -> None:
    check: TokenCheck = request.app.state.admin_auth
    if not check.enabled:
        raise Forbidden("admin routes are disabled: configure DIGIT_ADMIN_TOKENS or DIGIT_ADMIN_TOKENS_FILE")
    check.verify(credentials)


AdminAuth = Depends(require_admin_token)
