"""The card office's interface to the engine: authenticated HTTP, audited, live.

The engine is the only writer of card state and holds it in memory, so a
card-office change goes through the engine, never straight to the database.
Each change is one database transaction that makes it and writes its
``audit_log`` row (who, what, which card or holder, when); once it has
committed, the engine re-reads the rows it touched into memory
(``engine.state.refresh_cards``), so the very next tap sees it; a debt
limit is set in memory around its transaction instead, so that memory never
allows more than the database. A top-up is a kiosk TOPUP like any other:
decided by the ladder, batched, committed, idempotent by (terminal,
sequence), and answered only after its commit.

The server is aiohttp on the engine's own event loop. Operators
authenticate with ``Authorization: Bearer <operator>:<token>``, the token
derived from the master secret (``engine.keys.derive_operator_token``).
Bodies are JSON decoded into msgspec Structs that reject unknown fields;
every error is ``{"error": "...", "code": "..."}`` with a 4xx or 5xx status.

    GET  /v1/cards/{uid}                      the card as the engine sees it
    POST /v1/cards/{uid}/block                {"reason": "blocked" | "lost" | "stolen"}
    POST /v1/cards/{uid}/unblock
    POST /v1/cards                            {"uid", "holder_id"} or {"uid", "profile", "birth_date"}
    POST /v1/cards/{uid}/replace              {"new_uid"}
    POST /v1/cards/{uid}/topup                {"amount_cents", "terminal_id", "terminal_seq"}
    POST /v1/cards/{uid}/products             {"product", "valid_from"?}  sell a pass or ticket
    PUT  /v1/cards/{uid}/debt-limit           {"debt_limit_cents"}  how far offline taps may take it below its floor
    POST /v1/taps/{terminal_id}/{seq}/refund  {"terminal_id", "terminal_seq"}  (the desk's)
    PUT  /v1/holders/{holder_id}/eligibility  {"profile", "source", "valid_from", "valid_until"}

A refund is a REVERSAL made at the card office's desk terminal (a kiosk)
that names a tap of another terminal: decided and committed like any
request, idempotent by the desk's (terminal, sequence), allowed within
OFFICE_REFUND_WINDOW_S of the tap.

>>> admin = AdminServer(state, processor, pool, master_key, registry)  # doctest: +SKIP
>>> port = await admin.start("127.0.0.1", 9701)                         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Annotated, Any, Literal, TypeVar, cast

import asyncpg
import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from engine.codes import CardStatus, OperationKind, ProductKind, ResultCode, TerminalKind
from engine.keys import derive_operator_token, is_operator_name
from engine.limits import (
    ADMIN_BODY_MAX_BYTES,
    ADMIN_POOL_ACQUIRE_S,
    ADMIN_REFRESH_RETRY_S,
    ADMIN_REQUEST_WAIT_S,
    ADMIN_REQUESTS_REMEMBERED,
    ADMIN_SHUTDOWN_S,
    BALANCE_MAX_CENTS,
    DEBT_LIMIT_MAX_CENTS,
    PASS_START_AHEAD_MAX_DAYS,
    TOPUP_MAX_CENTS,
)
from engine.processor import INT64_MAX, Processor
from engine.rules import Rules
from engine.state import CityState, Terminal, now_ms, refresh_cards, refresh_products

log = logging.getLogger("citycard.admin")

# terminals.id is an SQL integer.
INT32_MAX = (1 << 31) - 1

# Transaction advisory lock held while allocating holder and account ids
# ("cityADMI" in ASCII, recognisable in pg_locks): two allocations, from this
# engine or a tool beside it, cannot pick the same id. Locking the tables
# instead would stall the writer's account updates.
ID_ALLOCATION_LOCK_KEY = 0x63697479_41444D49

# Sources the eligibility table accepts (schema/0003_city_rules.sql).
EligibilitySource = Literal[
    "enrolment", "pension", "unemployment", "age", "residency", "disability", "large_family", "office"
]
BlockReason = Literal["blocked", "lost", "stolen"]
CardUid = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
HolderId = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
# profiles.code: short words such as "student"; 64 is generous.
ProfileCode = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

_BLOCK_STATUS = {"blocked": CardStatus.BLOCKED, "lost": CardStatus.LOST, "stolen": CardStatus.STOLEN}
# A replaced or expired card stays so: blocking it and then unblocking it
# would bring it back to life beside its replacement.
_BLOCKABLE = frozenset({CardStatus.ACTIVE, CardStatus.BLOCKED, CardStatus.LOST, CardStatus.STOLEN})
_UNBLOCKABLE = frozenset({CardStatus.BLOCKED, CardStatus.LOST, CardStatus.STOLEN})

# Operation label values of citycard_admin_requests_total: the audit actions,
# plus "unknown" for a path or method the interface does not have.
OPERATIONS = (
    "card.show",
    "card.block",
    "card.unblock",
    "card.issue",
    "card.replace",
    "card.topup",
    "card.sell_product",
    "card.debt_limit",
    "tap.refund",
    "holder.eligibility",
    "unknown",
)
UNKNOWN_OPERATION = "unknown"
# Outcome label values, by HTTP status: a bounded set whatever the client sends.
_OUTCOMES = {
    200: "ok",
    201: "ok",
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "bad_request",
    409: "conflict",
    413: "too_large",
    422: "invalid",
    503: "unavailable",
    504: "timeout",
}
OUTCOMES = (*sorted(set(_OUTCOMES.values())), "error")

# Faults of the world (the database away, slow or out of connections), as
# opposed to faults in the request: answered 503, the operator retries.
_DATABASE_FAULTS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)

_T = TypeVar("_T")
Work = Callable[[web.Request, str], Awaitable[web.Response]]


# --- request bodies ------------------------------------------------------------------


# Request bodies are frozen and forbid unknown fields: a misspelt field is an
# error, never silently ignored.


class BlockRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reason: BlockReason


class UnblockRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class IssueRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new card for an existing holder (``holder_id``), or for a new holder
    of ``profile`` (with an optional ``birth_date``)."""

    uid: CardUid
    holder_id: HolderId | None = None
    profile: ProfileCode | None = None
    birth_date: datetime.date | None = None


class ReplaceRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    new_uid: CardUid


class EligibilityRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: ProfileCode
    source: EligibilitySource
    valid_from: datetime.date
    valid_until: datetime.date


class TopupRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount_cents: Annotated[int, msgspec.Meta(ge=1, le=TOPUP_MAX_CENTS)]
    terminal_id: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
    terminal_seq: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class ProductSaleRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A product of the rules in force; a season pass starts on ``valid_from``
    (default: today)."""

    product: ProfileCode
    valid_from: datetime.date | None = None


class DebtLimitRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How far below its floor offline taps that stand may take the card's account."""

    debt_limit_cents: Annotated[int, msgspec.Meta(ge=0, le=DEBT_LIMIT_MAX_CENTS)]


class RefundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The desk terminal (a kiosk) and its sequence number for this refund."""

    terminal_id: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
    terminal_seq: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind)
    for kind in (
        BlockRequest,
        UnblockRequest,
        IssueRequest,
        ReplaceRequest,
        EligibilityRequest,
        TopupRequest,
        ProductSaleRequest,
        DebtLimitRequest,
        RefundRequest,
    )
}
_ENCODER = msgspec.json.Encoder()


class AdminProblem(Exception):
    """A request that cannot be carried out as asked: answered with ``status``
    and ``{"error": message, "code": code}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": 'Bearer realm="citycard"'} if self.status == 401 else None
        return _json(self.status, {"error": self.message, "code": self.code}, headers)


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_ENCODER.encode(payload), content_type="application/json", headers=headers)


def _status_name(status: int) -> str:
    return CardStatus(status).name.lower()


def _card_not_found(uid: int) -> AdminProblem:
    return AdminProblem(404, "card_not_found", f"no card with uid {uid}")


class _OutcomeReply:
    """Where the processor delivers a card-office request's result (a ReplyTarget)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[tuple[int, int, int]]) -> None:
        self.future = future

    def deliver_result(
        self, request_id: int, terminal_seq: int, result: int, amount: int, balance: int, info: int
    ) -> None:
        # ``info`` is left out: its bits explain a tap; top-ups and refunds set none.
        # A request that gave up waiting (ADMIN_REQUEST_WAIT_S) has a done future.
        if not self.future.done():
            self.future.set_result((result, amount, balance))


# --- SQL -------------------------------------------------------------------------------

_AUDIT_SQL = "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4::jsonb) RETURNING id"

# debt_limit_cents counts for card accounts (kind 0) only (schema/0006_offline.sql).
_SHOW_SQL = (
    "SELECT c.uid, c.status, c.holder_id, c.account_id, c.replaces_uid, c.issued_at, h.birth_date,"
    " p.code AS profile, a.balance_cents, e.source, e.valid_from, e.valid_until,"
    " CASE WHEN a.kind = 0 THEN a.debt_limit_cents ELSE 0 END AS debt_limit_cents,"
    " (SELECT r.uid FROM cards r WHERE r.replaces_uid = c.uid) AS replaced_by"
    " FROM cards c JOIN holders h ON h.id = c.holder_id JOIN profiles p ON p.id = h.profile_id"
    " JOIN accounts a ON a.id = c.account_id"
    " LEFT JOIN eligibility e ON e.holder_id = c.holder_id AND e.profile_id = h.profile_id"
    " WHERE c.uid = $1"
)

# The same expression the processor reads event times with, so that the
# fingerprint of a retried request matches its record exactly.
_RECORDED_REQUEST_SQL = (
    "SELECT kind, card_uid, requested_cents, original_seq, original_terminal_id,"
    " (extract(epoch FROM event_time) * 1000)::int8 AS event_ms"
    " FROM taps WHERE terminal_id = $1 AND terminal_seq = $2"
)

# A card's account as a debt-limit change needs it; kind 0 is a card
# account, the only kind a debt limit applies to (schema/0006_offline.sql).
_CARD_ACCOUNT_SQL = (
    "SELECT c.account_id, a.kind = 0 AS card_account, a.balance_cents, a.floor_cents"
    " FROM cards c JOIN accounts a ON a.id = c.account_id WHERE c.uid = $1"
)

_PRODUCTS_OF_ACCOUNT_SQL = (
    "SELECT id, product_code, kind, group_code, valid_from, valid_until, rides, rides_used, price_cents,"
    " sold_at, sold_by, sold_to_card FROM card_products WHERE account_id = $1 ORDER BY id"
)

_INSERT_PRODUCT_SQL = (
    "INSERT INTO card_products (account_id, product_code, kind, group_code, rules_version, valid_from,"
    " valid_until, rides, price_cents, sold_by, sold_to_card) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " RETURNING id"
)


_UPSERT_ELIGIBILITY_SQL = (
    "INSERT INTO eligibility (holder_id, profile_id, source, valid_from, valid_until)"
    " VALUES ($1, $2, $3, $4, $5)"
    " ON CONFLICT (holder_id, profile_id) DO UPDATE SET source = EXCLUDED.source,"
    " valid_from = EXCLUDED.valid_from, valid_until = EXCLUDED.valid_until,"
    " import_id = NULL, updated_at = clock_timestamp()"
)


async def _audit(conn: asyncpg.Connection, actor: str, action: str, subject: str, detail: dict[str, Any]) -> int:
    """One audit_log row, in the caller's transaction; returns its id."""
    return int(await conn.fetchval(_AUDIT_SQL, actor, action, subject, _ENCODER.encode(detail).decode()))


# --- the server ------------------------------------------------------------------------


class AdminServer:
    """The card office's HTTP interface, on the engine's event loop."""

    def __init__(
        self,
        state: CityState,
        processor: Processor,
        pool: asyncpg.Pool,
        master_key: bytes,
        registry: CollectorRegistry,
    ) -> None:
        self._state = state
        self._processor = processor
        self._pool = pool
        self._master_key = master_key
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        # Changes run one at a time, transaction and refresh together: two
        # refreshes of one card finishing out of order could otherwise leave
        # memory with the older row.
        self._changes = asyncio.Lock()
        # Cards and holders whose committed change is not in memory yet.
        self._stale_uids: set[int] = set()
        self._stale_holders: set[int] = set()
        self._stale_products: set[int] = set()
        self._stale_task: asyncio.Task[None] | None = None
        # (terminal, seq) -> (the request's content, its event time) of recent
        # top-ups and refunds.
        self._request_events: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}
        self.requests = Counter(
            "citycard_admin_requests",
            "Card-office requests by operation and outcome (unauthorized, not_found, conflict, ...).",
            ["operation", "outcome"],
            registry=registry,
        )
        for operation in OPERATIONS:
            for outcome in OUTCOMES:
                self.requests.labels(operation, outcome)

    # --- lifecycle ------------------------------------------------------------------------

    def application(self) -> web.Application:
        """The aiohttp application: routes, limits and the JSON error middleware."""
        app = web.Application(client_max_size=ADMIN_BODY_MAX_BYTES, middlewares=[self._unrouted_middleware()])
        routes: list[tuple[str, str, str, Work]] = [
            ("GET", "/v1/cards/{uid}", "card.show", self._show),
            ("POST", "/v1/cards/{uid}/block", "card.block", self._block),
            ("POST", "/v1/cards/{uid}/unblock", "card.unblock", self._unblock),
            ("POST", "/v1/cards", "card.issue", self._issue),
            ("POST", "/v1/cards/{uid}/replace", "card.replace", self._replace),
            ("POST", "/v1/cards/{uid}/topup", "card.topup", self._topup),
            ("POST", "/v1/cards/{uid}/products", "card.sell_product", self._sell_product),
            ("PUT", "/v1/cards/{uid}/debt-limit", "card.debt_limit", self._debt_limit),
            ("POST", "/v1/taps/{terminal_id}/{terminal_seq}/refund", "tap.refund", self._refund),
            ("PUT", "/v1/holders/{holder_id}/eligibility", "holder.eligibility", self._eligibility),
        ]
        for method, path, operation, work in routes:
            app.router.add_route(method, path, self._endpoint(operation, work), name=operation)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port.
        Raises OSError when the address cannot be bound."""
        runner = web.AppRunner(self.application(), access_log=None, shutdown_timeout=ADMIN_SHUTDOWN_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("admin interface listening", extra={"host": host, "port": self.port})
        return self.port

    async def stop(self) -> None:
        """Stop listening; requests in progress get ADMIN_SHUTDOWN_S to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        task, self._stale_task = self._stale_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- request handling -------------------------------------------------------------------

    def _endpoint(self, operation: str, work: Work) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, operation, work)

        return handle

    def _unrouted_middleware(self) -> Any:
        """Requests for a path or method the interface lacks: authenticated
        like any other (no token, no map of the API), then a JSON 404 or 405."""

        @web.middleware
        async def middleware(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.match_info.route.name is not None:
                return await handler(request)

            async def unrouted(request: web.Request, operator: str) -> web.Response:
                await handler(request)  # raises the router's HTTPNotFound or HTTPMethodNotAllowed
                raise AdminProblem(404, "not_found", f"no endpoint {request.method} {request.path}")

            return await self._serve(request, UNKNOWN_OPERATION, unrouted)

        return middleware

    async def _serve(self, request: web.Request, operation: str, work: Work) -> web.Response:
        try:
            operator = self._authenticate(request)
            response = await work(request, operator)
        except AdminProblem as problem:
            response = problem.response()
        except web.HTTPException as error:
            response = _http_problem(request, error).response()
        except asyncpg.IntegrityConstraintViolationError as error:
            # A rule the schema enforces and the checks above did not catch.
            response = AdminProblem(409, "constraint_violation", f"refused by the database: {error}").response()
        except _DATABASE_FAULTS as error:
            log.warning("admin request: database unavailable", extra={"operation": operation, "error": repr(error)})
            response = AdminProblem(503, "database_unavailable", "the database is unavailable; retry").response()
        except Exception:  # a bug: answered 500 and logged, the engine carries on
            log.exception("admin request failed", extra={"operation": operation})
            response = AdminProblem(500, "internal", "internal error; the incident is logged").response()
        self.requests.labels(operation, _OUTCOMES.get(response.status, "error")).inc()
        return response

    def _authenticate(self, request: web.Request) -> str:
        """The operator named by a valid ``Authorization: Bearer <operator>:<token>``."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AdminProblem(401, "unauthorized", "missing credentials: Authorization: Bearer <operator>:<token>")
        operator, _, token = credentials.strip().partition(":")
        if is_operator_name(operator):
            expected = derive_operator_token(self._master_key, operator).encode()
            if hmac.compare_digest(token.encode("utf-8", "replace"), expected):
                return operator
        log.warning(
            "admin authentication failed",
            extra={"operator": operator if is_operator_name(operator) else "?", "peer": request.remote},
        )
        raise AdminProblem(401, "unauthorized", "unknown operator or wrong token")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._pool.acquire(timeout=ADMIN_POOL_ACQUIRE_S) as conn:
            yield conn

    async def _change(
        self,
        work: Callable[[asyncpg.Connection], Awaitable[_T]],
        *,
        uids: Iterable[int] = (),
        holders: Iterable[int] = (),
        products_of: Callable[[_T], list[int]] | None = None,
    ) -> _T:
        """Run ``work`` in one transaction, then bring the touched cards (and
        the products ``products_of(result)`` names) into memory."""
        async with self._changes, self._connection() as conn:
            async with conn.transaction():
                result = await work(conn)
            products = products_of(result) if products_of is not None else []
            await self._apply(conn, list(uids), list(holders), products)
        return result

    async def _apply(self, conn: asyncpg.Connection, uids: list[int], holders: list[int], products: list[int]) -> None:
        try:
            await refresh_cards(conn, self._state, uids=uids, holders=holders)
            await refresh_products(conn, self._state, products)
        except _DATABASE_FAULTS as error:
            self._stale_uids.update(uids)
            self._stale_holders.update(holders)
            self._stale_products.update(products)
            if self._stale_task is None or self._stale_task.done():
                self._stale_task = asyncio.create_task(self._refresh_stale(), name="citycard-admin-refresh")
            log.error("card-office change committed but not yet in memory", extra={"error": repr(error)})
            raise AdminProblem(
                503,
                "not_yet_effective",
                f"the change is committed but the engine could not read it back yet; it retries every"
                f" {ADMIN_REFRESH_RETRY_S:g} s",
            ) from error

    async def _refresh_stale(self) -> None:
        """Re-read committed changes that did not reach memory, until they do."""
        while self._stale_uids or self._stale_holders or self._stale_products:
            await asyncio.sleep(ADMIN_REFRESH_RETRY_S)
            uids, holders, products = list(self._stale_uids), list(self._stale_holders), list(self._stale_products)
            try:
                async with self._changes, self._connection() as conn:
                    await refresh_cards(conn, self._state, uids=uids, holders=holders)
                    await refresh_products(conn, self._state, products)
            except _DATABASE_FAULTS as error:
                log.warning("card-office change still not in memory", extra={"error": repr(error)})
                continue
            self._stale_uids.difference_update(uids)
            self._stale_holders.difference_update(holders)
            self._stale_products.difference_update(products)
            log.info("card-office change now in memory", extra={"cards": len(uids), "holders": len(holders)})

    def _log(
        self,
        operator: str,
        action: str,
        *,
        card: int | None = None,
        holder: int | None = None,
        subject: str | None = None,
        **extra: object,
    ) -> None:
        # Card uids appear in logs only as pseudonyms; the audit trail holds the uid.
        if subject is None:
            subject = self._processor.card_ref(card) if card is not None else f"holder:{holder}"
        log.info("card office", extra={"operator": operator, "action": action, "subject": subject, **extra})

    # --- operations ---------------------------------------------------------------------------

    async def _show(self, request: web.Request, operator: str) -> web.Response:
        uid = _path_number(request, "uid")
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(_SHOW_SQL, uid)
            if row is None:
                raise _card_not_found(uid)
            products = await conn.fetch(_PRODUCTS_OF_ACCOUNT_SQL, row["account_id"])
            # Looking at a holder's card is personal data processing: audited too.
            audit_id = await _audit(conn, operator, "card.show", f"card:{uid}", {})
        view = self._card_view(row)
        view["products"] = [self._product_view(product) for product in products]
        return _json(200, {**view, "audit_id": audit_id})

    def _product_view(self, row: asyncpg.Record) -> dict[str, Any]:
        """A product as the engine holds it: rides used from memory (the
        record lags the rides decided and not yet committed)."""
        held = self._state.product_by_id.get(row["id"])
        rides_used = held.rides_used if held is not None else row["rides_used"]
        return {
            "id": row["id"],
            "product": row["product_code"],
            "kind": ProductKind(row["kind"]).code,
            "group": row["group_code"],
            "valid_from": row["valid_from"],
            "valid_until": row["valid_until"],
            "rides": row["rides"],
            "rides_left": row["rides"] - rides_used if row["rides"] is not None else None,
            "price_cents": row["price_cents"],
            "sold_at": row["sold_at"],
            "sold_by": row["sold_by"],
            "sold_to_card": row["sold_to_card"],
        }

    def _card_view(self, row: asyncpg.Record) -> dict[str, Any]:
        """A card as the engine decides on it: status and balance from memory."""
        state = self._state
        position = state.card_position.get(row["uid"])
        status = state.card_status[position] if position is not None else row["status"]
        account = state.account_position.get(row["account_id"])
        balance = state.available(account) if account is not None else row["balance_cents"]
        debt_limit = state.debt_limit[account] if account is not None else row["debt_limit_cents"]
        eligibility = None
        if row["valid_from"] is not None:
            eligibility = {"source": row["source"], "valid_from": row["valid_from"], "valid_until": row["valid_until"]}
        return {
            "uid": row["uid"],
            "status": _status_name(status),
            "holder_id": row["holder_id"],
            "profile": row["profile"],
            "birth_date": row["birth_date"],
            "account_id": row["account_id"],
            "balance_cents": balance,
            "debt_limit_cents": debt_limit,
            "eligibility": eligibility,
            "replaces_uid": row["replaces_uid"],
            "replaced_by": row["replaced_by"],
            "issued_at": row["issued_at"],
        }

    async def _block(self, request: web.Request, operator: str) -> web.Response:
        uid = _path_number(request, "uid")
        body = await _decode(request, BlockRequest)
        return await self._set_status(operator, "card.block", uid, _BLOCK_STATUS[body.reason], {"reason": body.reason})

    async def _unblock(self, request: web.Request, operator: str) -> web.Response:
        uid = _path_number(request, "uid")
        await _decode(request, UnblockRequest)
        return await self._set_status(operator, "card.unblock", uid, CardStatus.ACTIVE, {})

    async def _set_status(
        self, operator: str, action: str, uid: int, target: CardStatus, detail: dict[str, Any]
    ) -> web.Response:
        """Block or unblock: idempotent, so a retried request answers "unchanged"."""
        allowed = _BLOCKABLE if target != CardStatus.ACTIVE else _UNBLOCKABLE | {CardStatus.ACTIVE}

        async def work(conn: asyncpg.Connection) -> dict[str, Any]:
            status = await conn.fetchval("SELECT status FROM cards WHERE uid = $1 FOR UPDATE", uid)
            if status is None:
                raise _card_not_found(uid)
            if status not in allowed:
                verb = "blocked" if target != CardStatus.ACTIVE else "unblocked"
                raise AdminProblem(409, "invalid_status", f"card {uid} is {_status_name(status)}: it cannot be {verb}")
            outcome = "unchanged" if status == target else "changed"
            if outcome == "changed":
                await conn.execute("UPDATE cards SET status = $2 WHERE uid = $1", uid, int(target))
            result = {
                **detail,
                "previous_status": _status_name(status),
                "status": _status_name(target),
                "outcome": outcome,
            }
            return {"uid": uid, **result, "audit_id": await _audit(conn, operator, action, f"card:{uid}", result)}

        result = await self._change(work, uids=[uid])
        self._log(operator, action, card=uid, outcome=result["outcome"])
        return _json(200, result)

    async def _issue(self, request: web.Request, operator: str) -> web.Response:
        body = await _decode(request, IssueRequest)
        if (body.holder_id is None) == (body.profile is None):
            raise AdminProblem(400, "invalid_request", "give holder_id (an existing holder) or profile (a new one)")
        if body.holder_id is not None and body.birth_date is not None:
            raise AdminProblem(400, "invalid_request", "birth_date is for a new holder; not with holder_id")
        if body.birth_date is not None and body.birth_date > datetime.date.today():
            raise AdminProblem(422, "invalid_birth_date", f"birth_date {body.birth_date} is in the future")

        async def work(conn: asyncpg.Connection) -> dict[str, Any]:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ID_ALLOCATION_LOCK_KEY)
            if await conn.fetchval("SELECT 1 FROM cards WHERE uid = $1", body.uid):
                raise AdminProblem(409, "card_exists", f"a card with uid {body.uid} exists already")
            holder_id = body.holder_id
            account_id: int | None = None
            if holder_id is not None:
                profile = await conn.fetchval(
                    "SELECT p.code FROM holders h JOIN profiles p ON p.id = h.profile_id WHERE h.id = $1", holder_id
                )
                if profile is None:
                    raise AdminProblem(404, "holder_not_found", f"no holder with id {holder_id}")
                # The holder's newest card's account: a second card spends the same balance.
                account_id = await conn.fetchval(
                    "SELECT account_id FROM cards WHERE holder_id = $1 ORDER BY issued_at DESC, uid DESC LIMIT 1",
                    holder_id,
                )
            else:
                profile = body.profile
                profile_id = await conn.fetchval("SELECT id FROM profiles WHERE code = $1", profile)
                if profile_id is None:
                    raise AdminProblem(422, "unknown_profile", f"no profile {profile!r}")
                holder_id = int(await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM holders"))
                await conn.execute(
                    "INSERT INTO holders (id, profile_id, birth_date) VALUES ($1, $2, $3)",
                    holder_id,
                    profile_id,
                    body.birth_date,
                )
            new_account = account_id is None
            if account_id is None:
                account_id = int(await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM accounts"))
                await conn.execute(
                    "INSERT INTO accounts (id, kind, name, balance_cents, floor_cents, ceiling_cents)"
                    " VALUES ($1, 0, $2, 0, 0, $3)",
                    account_id,
                    f"card {holder_id}",
                    BALANCE_MAX_CENTS,
                )
            await conn.execute(
                "INSERT INTO cards (uid, holder_id, account_id, status) VALUES ($1, $2, $3, $4)",
                body.uid,
                holder_id,
                account_id,
                int(CardStatus.ACTIVE),
            )
            detail = {
                "holder_id": holder_id,
                "account_id": account_id,
                "profile": profile,
                "new_holder": body.holder_id is None,
                "new_account": new_account,
            }
            audit_id = await _audit(conn, operator, "card.issue", f"card:{body.uid}", detail)
            return {"uid": body.uid, "status": "active", **detail, "audit_id": audit_id}

        try:
            result = await self._change(work, uids=[body.uid])
        except asyncpg.UniqueViolationError:
            # Another request took the uid (or an id) between the check and the insert.
            raise AdminProblem(409, "card_exists", f"card {body.uid} or its ids were taken meanwhile; retry") from None
        self._log(operator, "card.issue", card=body.uid, new_holder=result["new_holder"])
        return _json(201, result)

    async def _replace(self, request: web.Request, operator: str) -> web.Response:
        old_uid = _path_number(request, "uid")
        new_uid = (await _decode(request, ReplaceRequest)).new_uid

        async def work(conn: asyncpg.Connection) -> dict[str, Any]:
            old = await conn.fetchrow(
                "SELECT status, holder_id, account_id FROM cards WHERE uid = $1 FOR UPDATE", old_uid
            )
            if old is None:
                raise _card_not_found(old_uid)
            if old["status"] == CardStatus.REPLACED:
                raise AdminProblem(409, "already_replaced", f"card {old_uid} has been replaced already")
            if await conn.fetchval("SELECT 1 FROM cards WHERE uid = $1", new_uid):
                raise AdminProblem(409, "card_exists", f"a card with uid {new_uid} exists already")
            # Same holder, same account: balance, passes and eligibility
            # carry over without a transfer.
            await conn.execute(
                "INSERT INTO cards (uid, holder_id, account_id, status, replaces_uid) VALUES ($1, $2, $3, $4, $5)",
                new_uid,
                old["holder_id"],
                old["account_id"],
                int(CardStatus.ACTIVE),
                old_uid,
            )
            await conn.execute("UPDATE cards SET status = $2 WHERE uid = $1", old_uid, int(CardStatus.REPLACED))
            detail = {
                "new_uid": new_uid,
                "previous_status": _status_name(old["status"]),
                "holder_id": old["holder_id"],
                "account_id": old["account_id"],
            }
            audit_id = await _audit(conn, operator, "card.replace", f"card:{old_uid}", detail)
            return {"uid": old_uid, "status": "replaced", **detail, "audit_id": audit_id}

        try:
            result = await self._change(work, uids=[old_uid, new_uid])
        except asyncpg.UniqueViolationError:
            raise AdminProblem(409, "card_exists", f"card {new_uid} was issued meanwhile") from None
        self._log(operator, "card.replace", card=old_uid, new_card=self._processor.card_ref(new_uid))
        return _json(201, result)

    async def _eligibility(self, request: web.Request, operator: str) -> web.Response:
        holder_id = _path_number(request, "holder_id")
        body = await _decode(request, EligibilityRequest)
        if body.valid_until < body.valid_from:
            raise AdminProblem(422, "invalid_period", f"valid_until {body.valid_until} is before {body.valid_from}")

        async def work(conn: asyncpg.Connection) -> dict[str, Any]:
            holder_profile = await conn.fetchval(
                "SELECT p.code FROM holders h JOIN profiles p ON p.id = h.profile_id WHERE h.id = $1 FOR UPDATE OF h",
                holder_id,
            )
            if holder_profile is None:
                raise AdminProblem(404, "holder_not_found", f"no holder with id {holder_id}")
            profile_id = await conn.fetchval("SELECT id FROM profiles WHERE code = $1", body.profile)
            if profile_id is None:
                raise AdminProblem(422, "unknown_profile", f"no profile {body.profile!r}")
            previous = await conn.fetchrow(
                "SELECT source, valid_from, valid_until FROM eligibility WHERE holder_id = $1 AND profile_id = $2",
                holder_id,
                profile_id,
            )
            await conn.execute(
                _UPSERT_ELIGIBILITY_SQL, holder_id, profile_id, body.source, body.valid_from, body.valid_until
            )
            detail = {
                "profile": body.profile,
                "source": body.source,
                "valid_from": body.valid_from,
                "valid_until": body.valid_until,
                "previous": dict(previous) if previous is not None else None,
                # A period for another profile than the holder's is kept, and
                # counts once the holder has that profile.
                "holder_profile": holder_profile,
            }
            audit_id = await _audit(conn, operator, "holder.eligibility", f"holder:{holder_id}", detail)
            return {"holder_id": holder_id, **detail, "audit_id": audit_id}

        result = await self._change(work, holders=[holder_id])
        self._log(operator, "holder.eligibility", holder=holder_id, profile=body.profile)
        return _json(200, result)

    async def _topup(self, request: web.Request, operator: str) -> web.Response:
        uid = _path_number(request, "uid")
        body = await _decode(request, TopupRequest)
        terminal = self._desk(body.terminal_id, "top up")
        if uid not in self._state.card_position:
            raise _card_not_found(uid)
        content = (OperationKind.TOPUP, uid, body.amount_cents)
        event_ms = await self._event_time(terminal, body.terminal_seq, content)
        result, amount, balance = await self._submit_and_wait(
            terminal, OperationKind.TOPUP, body.terminal_seq, event_ms, uid=uid, requested=body.amount_cents
        )
        code = ResultCode(result)
        detail = {
            "terminal_id": body.terminal_id,
            "terminal_seq": body.terminal_seq,
            "requested_cents": body.amount_cents,
            "result": code.name,
            "amount_cents": amount,
            "balance_cents": balance,
        }
        audit_id = await self._audit_outcome(operator, "card.topup", f"card:{uid}", detail)
        self._log(operator, "card.topup", card=uid, result=code.name)
        _refuse_unsettled(code, body.terminal_seq)
        return _json(200, {"uid": uid, **detail, "approved": code == ResultCode.APPROVED, "audit_id": audit_id})

    async def _refund(self, request: web.Request, operator: str) -> web.Response:
        original_terminal = _path_number(request, "terminal_id")
        original_seq = _path_number(request, "terminal_seq")
        body = await _decode(request, RefundRequest)
        terminal = self._desk(body.terminal_id, "refund")
        if original_terminal not in self._state.terminals:
            raise AdminProblem(404, "terminal_not_found", f"no terminal {original_terminal}")
        content = (OperationKind.REVERSAL, original_terminal, original_seq)
        event_ms = await self._event_time(terminal, body.terminal_seq, content)
        result, amount, balance = await self._submit_and_wait(
            terminal,
            OperationKind.REVERSAL,
            body.terminal_seq,
            event_ms,
            original_seq=original_seq,
            original_terminal=original_terminal,
        )
        code = ResultCode(result)
        detail = {
            "terminal_id": body.terminal_id,
            "terminal_seq": body.terminal_seq,
            "original_terminal_id": original_terminal,
            "original_seq": original_seq,
            "result": code.name,
            "amount_cents": amount,
            "balance_cents": balance,
        }
        audit_id = await self._audit_outcome(operator, "tap.refund", f"tap:{original_terminal}:{original_seq}", detail)
        self._log(operator, "tap.refund", subject=f"tap:{original_terminal}:{original_seq}", result=code.name)
        _refuse_unsettled(code, body.terminal_seq)
        return _json(200, {**detail, "approved": code == ResultCode.APPROVED, "audit_id": audit_id})

    async def _sell_product(self, request: web.Request, operator: str) -> web.Response:
        uid = _path_number(request, "uid")
        body = await _decode(request, ProductSaleRequest)
        state = self._state
        version = state.rules_version
        today = datetime.datetime.now(datetime.UTC).date()
        valid_from = body.valid_from if body.valid_from is not None else today
        if valid_from < today or (valid_from - today).days > PASS_START_AHEAD_MAX_DAYS:
            raise AdminProblem(
                422,
                "invalid_period",
                f"valid_from {valid_from} must be from today to {PASS_START_AHEAD_MAX_DAYS} days ahead",
            )

        async def work(conn: asyncpg.Connection) -> dict[str, Any]:
            card = await conn.fetchrow(
                "SELECT c.status, c.account_id, p.code AS profile, h.profile_id FROM cards c"
                " JOIN holders h ON h.id = c.holder_id JOIN profiles p ON p.id = h.profile_id WHERE c.uid = $1",
                uid,
            )
            if card is None:
                raise _card_not_found(uid)
            if card["status"] != CardStatus.ACTIVE:
                raise AdminProblem(
                    409, "card_not_active", f"card {uid} is {_status_name(card['status'])}: sell to an active card"
                )
            document = await conn.fetchval("SELECT document::text FROM rules_versions WHERE version = $1", version)
            if document is None:
                raise AdminProblem(409, "no_rules", "no rules version is in force: there is nothing to sell")
            rules = msgspec.json.decode(document, type=Rules)
            product = next((item for item in rules.products if item.code == body.product), None)
            if product is None:
                known = ", ".join(item.code for item in rules.products) or "none"
                raise AdminProblem(
                    422, "unknown_product", f"no product {body.product!r} in rules version {version} (sold: {known})"
                )
            if product.profiles is not None:
                await _check_entitled(conn, uid, card["profile"], product.profiles, rules, today)
            season = product.kind == "season"
            valid_until = valid_from + datetime.timedelta(days=(product.days or 1) - 1) if season else None
            product_id = int(
                await conn.fetchval(
                    _INSERT_PRODUCT_SQL,
                    card["account_id"],
                    product.code,
                    ProductKind[product.kind.upper()],
                    product.group,
                    version,
                    valid_from if season else None,
                    valid_until,
                    product.rides,
                    product.price_cents,
                    operator,
                    uid,
                )
            )
            detail = {
                "product_id": product_id,
                "product": product.code,
                "kind": product.kind,
                "group": product.group,
                "valid_from": valid_from if season else None,
                "valid_until": valid_until,
                "rides": product.rides,
                "price_cents": product.price_cents,
                "paid_at": "card office",
                "rules_version": version,
                "account_id": card["account_id"],
            }
            audit_id = await _audit(conn, operator, "card.sell_product", f"card:{uid}", detail)
            return {"uid": uid, **detail, "audit_id": audit_id}

        result = await self._change(work, products_of=lambda sold: [sold["product_id"]])
        self._log(operator, "card.sell_product", card=uid, product=body.product)
        return _json(201, result)

    async def _debt_limit(self, request: web.Request, operator: str) -> web.Response:
        uid = _path_number(request, "uid")
        limit = (await _decode(request, DebtLimitRequest)).debt_limit_cents
        async with self._changes, self._connection() as conn:
            card = await conn.fetchrow(_CARD_ACCOUNT_SQL, uid)
            if card is None:
                raise _card_not_found(uid)
            account_id = card["account_id"]
            if not card["card_account"]:
                raise AdminProblem(
                    409,
                    "not_a_card_account",
                    f"card {uid} pays from account {account_id}, which is not a card account: it has no debt limit",
                )
            position = self._state.account_position.get(account_id)
            if position is not None:
                result = await self._change_held_debt_limit(conn, operator, uid, position, limit)
            else:
                # An account the engine does not hold: the database is all
                # there is to change, and a load reads the limit from there.
                _refuse_below_debt(uid, limit, card["floor_cents"], card["balance_cents"])
                async with conn.transaction():
                    result = await _write_debt_limit(conn, operator, uid, account_id, limit)
                # Unless an eligibility import read it in meanwhile (engine.live).
                position = self._state.account_position.get(account_id)
                if position is not None:
                    self._state.debt_limit[position] = limit
        self._log(operator, "card.debt_limit", card=uid, outcome=result["outcome"])
        return _json(200, result)

    async def _change_held_debt_limit(
        self, conn: asyncpg.Connection, operator: str, uid: int, position: int, limit: int
    ) -> dict[str, Any]:
        """Change the debt limit of an account the engine holds (``position``),
        in memory and in the database, never letting memory allow more than
        the database."""
        state = self._state
        # The lowest balance the account's debits decided so far can leave.
        _refuse_below_debt(uid, limit, state.floor[position], state.available(position))
        # Offline taps are decided against memory and committed against the
        # database's CHECK: a tap decided on a larger allowance than the one
        # committed would fail its whole batch. So while the change is on its
        # way memory holds the smaller of the two limits: a lower limit is in
        # memory before the database has it, a higher one only after.
        held = state.debt_limit[position]
        state.debt_limit[position] = min(held, limit)
        committing = False
        try:
            async with conn.transaction():
                result = await _write_debt_limit(conn, operator, uid, state.account_id[position], limit)
                committing = True
        except BaseException:
            if not committing:
                state.debt_limit[position] = held  # rolled back: the old limit stands
            else:
                # The commit itself failed: it may have happened or not. The
                # smaller limit is safe either way; repeating the request settles it.
                log.error("debt limit change: outcome of the commit unknown", extra={"operator": operator})
            raise
        state.debt_limit[position] = limit
        return result

    def _desk(self, terminal_id: int, action: str) -> Terminal:
        """The card office's desk terminal: a kiosk, the only kind that moves money by hand."""
        terminal = self._state.terminals.get(terminal_id)
        if terminal is None:
            raise AdminProblem(404, "terminal_not_found", f"no terminal {terminal_id}")
        if terminal.kind != TerminalKind.KIOSK:
            raise AdminProblem(422, "not_a_kiosk", f"terminal {terminal_id} is not a kiosk: it cannot {action}")
        return terminal

    async def _submit_and_wait(
        self,
        terminal: Terminal,
        kind: int,
        terminal_seq: int,
        event_ms: int,
        *,
        uid: int = 0,
        requested: int = 0,
        original_seq: int | None = None,
        original_terminal: int | None = None,
    ) -> tuple[int, int, int]:
        """Hand one request to the processor, as the desk's terminal would,
        and wait for its committed outcome: (result, amount, balance)."""
        future: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        processor = self._processor
        processor.submit(
            _OutcomeReply(future),
            0,
            terminal,
            kind,
            terminal_seq,
            uid,
            0,
            0,
            requested,
            original_seq,
            event_ms,
            original_terminal,
        )
        processor.flush()
        try:
            return await asyncio.wait_for(future, ADMIN_REQUEST_WAIT_S)
        except TimeoutError:
            raise AdminProblem(
                504,
                "outcome_pending",
                f"no outcome within {ADMIN_REQUEST_WAIT_S:g} s; retry with the same terminal_seq to learn it",
            ) from None

    async def _audit_outcome(self, operator: str, action: str, subject: str, detail: dict[str, Any]) -> int | None:
        """The audit row of a request the processor decided (its own record is in taps)."""
        try:
            async with self._connection() as conn:
                return await _audit(conn, operator, action, subject, detail)
        except _DATABASE_FAULTS as error:
            # The request itself is in the record (taps) whatever happens here.
            log.error("card-office request not audited", extra={"operator": operator, "error": repr(error)})
            return None

    async def _event_time(self, terminal: Terminal, terminal_seq: int, content: tuple[int, ...]) -> int:
        """The event time of a card-office top-up or refund.

        Part of a request's content is its event time: a retry must carry the
        original's, or it is answered SEQUENCE_REUSED. A retry of a request
        still in flight finds it here; one already committed, in the record.
        ``content`` is (kind, card uid, amount) or (kind, original terminal,
        original sequence).
        """
        key = (terminal.id, terminal_seq)
        remembered = self._request_events.get(key)
        if remembered is not None and remembered[0] == content:
            return remembered[1]
        event_ms = now_ms()
        if terminal_seq <= terminal.high_seq:
            async with self._connection() as conn:
                row = await conn.fetchrow(_RECORDED_REQUEST_SQL, terminal.id, terminal_seq)
            if row is not None:
                if row["kind"] == OperationKind.REVERSAL:
                    recorded = (row["kind"], row["original_terminal_id"] or terminal.id, row["original_seq"])
                else:
                    recorded = (row["kind"], row["card_uid"], row["requested_cents"])
                if recorded == content:
                    event_ms = int(row["event_ms"])
        events = self._request_events
        events[key] = (content, event_ms)
        if len(events) > ADMIN_REQUESTS_REMEMBERED:
            del events[next(iter(events))]
        return event_ms


# --- helpers -----------------------------------------------------------------------------


async def _check_entitled(
    conn: asyncpg.Connection, uid: int, profile: str, allowed: Iterable[str], rules: Rules, today: datetime.date
) -> None:
    """A product for some profiles only: the holder's, and for a concession
    profile an eligibility period that holds today (read in the sale's
    transaction, so a card issued a moment ago is checked like any other)."""
    if profile not in allowed:
        raise AdminProblem(
            422, "not_entitled", f"the holder's profile {profile!r} may not hold it (only: {', '.join(allowed)})"
        )
    if profile == rules.concessions.standard_profile:
        return
    valid = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM cards c JOIN holders h ON h.id = c.holder_id"
        " JOIN eligibility e ON e.holder_id = c.holder_id AND e.profile_id = h.profile_id"
        " WHERE c.uid = $1 AND $2 BETWEEN e.valid_from AND e.valid_until)",
        uid,
        today,
    )
    if not valid:
        raise AdminProblem(
            422, "not_entitled", f"the holder's {profile} eligibility is not valid today: renew it first"
        )


def _refuse_below_debt(uid: int, limit: int, floor: int, lowest: int) -> None:
    """A debt limit smaller than what the account owes below its floor
    (``lowest`` is the lowest balance it can be left with) is refused."""
    owed = floor - lowest
    if owed > limit:
        raise AdminProblem(
            409,
            "in_debt",
            f"card {uid}'s account owes {owed} cents below its floor (debits not yet committed included):"
            f" its debt limit cannot go below {owed} until that is paid back",
        )


async def _write_debt_limit(
    conn: asyncpg.Connection, operator: str, uid: int, account_id: int, limit: int
) -> dict[str, Any]:
    """Set a card account's debt limit and write the audit row, in the
    caller's transaction: idempotent, a repeat answers "unchanged"."""
    previous = await conn.fetchval("SELECT debt_limit_cents FROM accounts WHERE id = $1 FOR UPDATE", account_id)
    outcome = "unchanged" if previous == limit else "changed"
    if outcome == "changed":
        await conn.execute("UPDATE accounts SET debt_limit_cents = $2 WHERE id = $1", account_id, limit)
    detail = {
        "account_id": account_id,
        "previous_debt_limit_cents": previous,
        "debt_limit_cents": limit,
        "outcome": outcome,
    }
    audit_id = await _audit(conn, operator, "card.debt_limit", f"card:{uid}", detail)
    return {"uid": uid, **detail, "audit_id": audit_id}


def _refuse_unsettled(code: ResultCode, terminal_seq: int) -> None:
    """Outcomes that are not a decision about the card: answered as HTTP errors."""
    if code == ResultCode.BUSY_RETRY:
        raise AdminProblem(503, "busy_retry", "the engine could not take it now; retry with the same terminal_seq")
    if code == ResultCode.SEQUENCE_REUSED:
        raise AdminProblem(409, "sequence_reused", f"terminal_seq {terminal_seq} was used for another request")
    if code == ResultCode.PROTOCOL_ERROR:
        raise AdminProblem(400, "invalid_request", "the engine refused the request's fields")


def _path_number(request: web.Request, name: str) -> int:
    """A decimal id from the path (card uid, holder id), 0..2**63-1."""
    text = request.match_info[name]
    if not (text.isascii() and text.isdigit()) or int(text) > INT64_MAX:
        raise AdminProblem(400, "invalid_path", f"{name} must be a decimal number from 0 to {INT64_MAX}, got {text!r}")
    return int(text)


async def _decode(request: web.Request, kind: type[_T]) -> _T:
    """The request body as ``kind``; an empty body is ``{}``."""
    too_large = AdminProblem(413, "body_too_large", f"request body above {ADMIN_BODY_MAX_BYTES} bytes")
    if request.content_length is not None and request.content_length > ADMIN_BODY_MAX_BYTES:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    try:
        return cast(_T, _DECODERS[kind].decode(raw if raw.strip() else b"{}"))
    except msgspec.ValidationError as error:
        raise AdminProblem(400, "invalid_request", str(error)) from None
    except msgspec.DecodeError as error:
        raise AdminProblem(400, "invalid_json", str(error)) from None


def _http_problem(request: web.Request, error: web.HTTPException) -> AdminProblem:
    """aiohttp's own refusals (no such route, wrong method, body too large) as JSON problems."""
    if error.status == 404:
        return AdminProblem(404, "not_found", f"no endpoint {request.method} {request.path}")
    if error.status == 405:
        return AdminProblem(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
    if error.status == 413:
        return AdminProblem(413, "body_too_large", f"request body above {ADMIN_BODY_MAX_BYTES} bytes")
    return AdminProblem(error.status, "http_error", error.reason)
