"""A small blocking client of the engine's card-office interface (``engine/admin.py``).

Used by the ``citycard card`` and ``citycard holder`` commands. Every method
returns the engine's JSON answer as a dict, or raises ``AdminError`` with the
engine's own message and code (``AdminUnreachable`` when there is no answer).

>>> client = AdminClient("http://127.0.0.1:9701", "ana.garcia", token)  # doctest: +SKIP
>>> client.block(1234567890, reason="lost")["outcome"]                   # doctest: +SKIP
'changed'
"""

from __future__ import annotations

import datetime
import json
import urllib.error
import urllib.request
from typing import Any

import msgspec

DEFAULT_ADMIN_URL = "http://127.0.0.1:9701"

# An answer takes milliseconds; a top-up waits for its commit, which the
# engine bounds at ADMIN_REQUEST_WAIT_S (10 s). 30 s covers that with margin
# and still reports a wedged engine.
REQUEST_TIMEOUT_S = 30.0

# The interface is on the engine's host or its network, never behind an
# HTTP proxy: ignore any *_proxy environment variables.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AdminError(Exception):
    """The engine refused a request (``status`` and ``code`` as it answered), or gave no answer."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class AdminUnreachable(AdminError):
    """No answer: the engine is not running there, or the network failed."""


class AdminClient:
    """One operator's session with the admin interface at ``base_url``."""

    def __init__(self, base_url: str, operator: str, token: str, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.operator = operator
        self._token = token
        self.timeout_s = timeout_s

    # --- operations --------------------------------------------------------------------

    def show(self, uid: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/cards/{uid}")

    def block(self, uid: int, *, reason: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/cards/{uid}/block", {"reason": reason})

    def unblock(self, uid: int) -> dict[str, Any]:
        return self._request("POST", f"/v1/cards/{uid}/unblock", {})

    def issue(
        self,
        uid: int,
        *,
        holder_id: int | None = None,
        profile: str | None = None,
        birth_date: datetime.date | None = None,
    ) -> dict[str, Any]:
        """A new card for an existing holder (``holder_id``) or for a new holder of ``profile``."""
        body: dict[str, Any] = {"uid": uid}
        if holder_id is not None:
            body["holder_id"] = holder_id
        if profile is not None:
            body["profile"] = profile
        if birth_date is not None:
            body["birth_date"] = birth_date
        return self._request("POST", "/v1/cards", body)

    def replace(self, old_uid: int, new_uid: int) -> dict[str, Any]:
        return self._request("POST", f"/v1/cards/{old_uid}/replace", {"new_uid": new_uid})

    def topup(self, uid: int, amount_cents: int, *, terminal_id: int, terminal_seq: int) -> dict[str, Any]:
        body = {"amount_cents": amount_cents, "terminal_id": terminal_id, "terminal_seq": terminal_seq}
        return self._request("POST", f"/v1/cards/{uid}/topup", body)

    def sell_product(self, uid: int, product: str, *, valid_from: datetime.date | None = None) -> dict[str, Any]:
        """Sell a season pass or multi-ride ticket of the rules in force (paid at the desk)."""
        body: dict[str, Any] = {"product": product}
        if valid_from is not None:
            body["valid_from"] = valid_from
        return self._request("POST", f"/v1/cards/{uid}/products", body)

    def set_debt_limit(self, uid: int, debt_limit_cents: int) -> dict[str, Any]:
        """How far below its floor offline taps may take the card's account."""
        return self._request("PUT", f"/v1/cards/{uid}/debt-limit", {"debt_limit_cents": debt_limit_cents})

    def refund(
        self, original_terminal_id: int, original_seq: int, *, terminal_id: int, terminal_seq: int
    ) -> dict[str, Any]:
        """Refund (reverse) a tap of any terminal at the desk terminal ``terminal_id``."""
        body = {"terminal_id": terminal_id, "terminal_seq": terminal_seq}
        return self._request("POST", f"/v1/taps/{original_terminal_id}/{original_seq}/refund", body)

    def set_eligibility(
        self,
        holder_id: int,
        *,
        profile: str,
        source: str,
        valid_from: datetime.date,
        valid_until: datetime.date,
    ) -> dict[str, Any]:
        body = {"profile": profile, "source": source, "valid_from": valid_from, "valid_until": valid_until}
        return self._request("PUT", f"/v1/holders/{holder_id}/eligibility", body)

    # --- transport --------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url + path,
            data=msgspec.json.encode(body) if body is not None else None,
            method=method,
            headers={
                "Authorization": f"Bearer {self.operator}:{self._token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                return _json_object(response.read())
        except urllib.error.HTTPError as error:
            answer = _json_object(error.read())
            raise AdminError(
                str(answer.get("error") or f"HTTP {error.code}"), status=error.code, code=answer.get("code")
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise AdminUnreachable(f"no answer from the admin interface at {self.base_url}: {reason}") from None


def _json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; {} for anything else (an empty body, a proxy's HTML page)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
