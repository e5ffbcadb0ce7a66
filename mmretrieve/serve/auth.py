"""The optional API key: a header for programs, a cookie for the page's <img> and <a> requests."""

from __future__ import annotations

import hmac
from urllib.parse import unquote

from .problems import RequestProblem

HEADER = "x-api-key"
COOKIE = "mmretrieve_api_key"


def presented_key(headers, cookies) -> str | None:
    """The key a request carries: X-API-Key, else Authorization: Bearer, else the page's cookie."""
    if headers.get(HEADER):
        return headers[HEADER]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    cookie = cookies.get(COOKIE)
    return unquote(cookie) if cookie else None  # the page stores it URI-encoded


def check_key(expected: str | None, headers, cookies) -> None:
    """Raise 401 unless no key is configured or the request carries the right one."""
    if not expected:
        return
    given = presented_key(headers, cookies)
    # compare_digest: the time taken does not reveal how much of a guess was right.
    if given is None or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise RequestProblem(401, "missing or wrong API key: send it in the X-API-Key header "
                                  "(or as Authorization: Bearer KEY)",
                             {"WWW-Authenticate": 'Bearer realm="mmretrieve"'})
