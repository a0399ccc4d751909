"""The card office's card commands, carried out by the running engine.

    citycard card show UID
    citycard card block UID --reason lost
    citycard card unblock UID
    citycard card issue --uid UID (--holder ID | --profile P [--birth-date D])
    citycard card replace OLD NEW
    citycard card topup UID AMOUNT_CENTS --terminal T [--seq S]
    citycard card sell UID PRODUCT [--from D]
    citycard card debt-limit UID CENTS
    citycard card refund TERMINAL SEQ --desk T [--desk-seq S]
    citycard holder eligibility HOLDER --profile P --source S --from D --until D
    citycard admin-token NAME

Each goes to the engine's admin interface (``engine/admin.py``), which makes
the change, writes the audit row and applies it to the next tap. Common
options: ``--admin-url`` (default http://127.0.0.1:9701, or
``$CITYCARD_ADMIN_URL``), ``--operator`` (``$CITYCARD_OPERATOR``, else the
login name) and ``--token`` (``$CITYCARD_OPERATOR_TOKEN``, else derived from
the master key in ``--data-dir``). ``admin-token`` prints an operator's
token for whoever holds the master key.

``add_card_commands(subparsers)`` adds the commands; each leaf sets
``handler``, a function of the parsed arguments returning the exit status,
and ``CARD_COMMANDS`` maps the top-level names to ``run_card_command``.

Exit statuses: 0 done; 1 no answer from the engine, or it failed; 2 bad
usage or no credentials; 3 refused by the engine (unauthorized, not found,
conflict, invalid) or a top-up declined.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from engine.admin_client import DEFAULT_ADMIN_URL, AdminClient, AdminError, AdminUnreachable
from engine.db import default_data_dir
from engine.keys import MasterKeyError, derive_operator_token, is_operator_name, load_master_key
from engine.limits import DEBT_LIMIT_MAX_CENTS

ADMIN_URL_ENV = "CITYCARD_ADMIN_URL"
OPERATOR_ENV = "CITYCARD_OPERATOR"
TOKEN_ENV = "CITYCARD_OPERATOR_TOKEN"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3

BLOCK_REASONS = ("blocked", "lost", "stolen")
ELIGIBILITY_SOURCES = (
    "enrolment",
    "pension",
    "unemployment",
    "age",
    "residency",
    "disability",
    "large_family",
    "office",
)

Handler = Callable[[argparse.Namespace], int]


class CredentialsError(Exception):
    """No usable operator name or token (exit status 2)."""


def add_card_commands(subparsers: Any) -> None:
    """Add ``card``, ``holder`` and ``admin-token`` to ``citycard``'s subparsers.

    Example::

        commands = parser.add_subparsers(dest="command", required=True)
        add_card_commands(commands)
        args = parser.parse_args(["card", "block", "1234", "--reason", "lost"])
        args.handler(args)  # 0 when the engine blocked it
    """
    card = subparsers.add_parser("card", help="card-office operations on one card, through the running engine")
    cards = card.add_subparsers(dest="card_command", required=True)

    show = _leaf(
        cards, "show", "the card as the engine sees it: status, holder, balance, debt limit, eligibility", cmd_card_show
    )
    show.add_argument("uid", type=card_uid, help="card uid (decimal, or 0x... hex)")

    block = _leaf(cards, "block", "block a card: the next tap is declined", cmd_card_block)
    block.add_argument("uid", type=card_uid)
    block.add_argument("--reason", choices=BLOCK_REASONS, default="blocked")

    unblock = _leaf(cards, "unblock", "make a blocked, lost or stolen card active again", cmd_card_unblock)
    unblock.add_argument("uid", type=card_uid)

    issue = _leaf(cards, "issue", "issue a new card", cmd_card_issue)
    issue.add_argument("--uid", type=card_uid, required=True, help="the new card's uid")
    whose = issue.add_mutually_exclusive_group(required=True)
    whose.add_argument("--holder", type=int, help="an existing holder: the card shares their account")
    whose.add_argument("--profile", help="a new holder of this profile (e.g. standard, student)")
    issue.add_argument("--birth-date", type=iso_date, help="the new holder's birth date (YYYY-MM-DD)")

    replace = _leaf(cards, "replace", "replace a card: the new one keeps holder, balance and passes", cmd_card_replace)
    replace.add_argument("old", type=card_uid)
    replace.add_argument("new", type=card_uid)

    topup = _leaf(cards, "topup", "top a card up at a kiosk terminal, as a kiosk would", cmd_card_topup)
    topup.add_argument("uid", type=card_uid)
    topup.add_argument("amount_cents", type=int)
    topup.add_argument("--terminal", type=int, required=True, help="the kiosk terminal id")
    topup.add_argument(
        "--seq", type=int, help="the kiosk's sequence; retry with the same one (default: microseconds since the epoch)"
    )

    sell = _leaf(cards, "sell", "sell a season pass or multi-ride ticket, paid at the desk", cmd_card_sell)
    sell.add_argument("uid", type=card_uid)
    sell.add_argument("product", help="a product code of the rules in force (citycard rules show)")
    sell.add_argument("--from", dest="valid_from", type=iso_date, help="a season pass's first day (default: today)")

    debt_limit = _leaf(
        cards, "debt-limit", "set how far below its floor offline taps may take the card's account", cmd_card_debt_limit
    )
    debt_limit.add_argument("uid", type=card_uid)
    debt_limit.add_argument(
        "debt_limit_cents", type=int, metavar="CENTS", help=f"0 (never below the floor) to {DEBT_LIMIT_MAX_CENTS}"
    )

    refund = _leaf(cards, "refund", "refund a tap of any terminal, within 30 days", cmd_card_refund)
    refund.add_argument("terminal", type=int, help="the terminal that recorded the tap")
    refund.add_argument("seq", type=int, help="the tap's sequence number at that terminal")
    refund.add_argument("--desk", type=int, required=True, help="the card office's desk terminal id (a kiosk)")
    refund.add_argument(
        "--desk-seq", type=int, help="the desk's sequence; retry with the same one (default: microseconds now)"
    )

    holder = subparsers.add_parser("holder", help="card-office operations on a holder, through the running engine")
    holders = holder.add_subparsers(dest="holder_command", required=True)
    eligibility = _leaf(holders, "eligibility", "set a holder's concession eligibility period", cmd_holder_eligibility)
    eligibility.add_argument("holder", type=int)
    eligibility.add_argument("--profile", required=True, help="the concession profile (e.g. student)")
    eligibility.add_argument("--source", required=True, choices=ELIGIBILITY_SOURCES)
    eligibility.add_argument("--from", dest="valid_from", type=iso_date, required=True, help="first day (YYYY-MM-DD)")
    eligibility.add_argument("--until", dest="valid_until", type=iso_date, required=True, help="last day, inclusive")

    token = subparsers.add_parser("admin-token", help="print a card-office operator's token")
    token.add_argument("name", help="operator name: 1 to 100 of A-Z a-z 0-9 . _ -")
    token.add_argument("--data-dir", type=Path, default=None, help="where master.key is (default: ./var)")
    token.set_defaults(handler=cmd_admin_token)


def run_card_command(args: argparse.Namespace) -> int:
    """Run the leaf command the arguments name."""
    handler: Handler = args.handler
    return handler(args)


CARD_COMMANDS: dict[str, Handler] = {
    "card": run_card_command,
    "holder": run_card_command,
    "admin-token": run_card_command,
}


def _leaf(commands: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL,
        help=f"the engine's admin interface (default: ${ADMIN_URL_ENV} or {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument("--operator", help=f"who is acting (default: ${OPERATOR_ENV}, else the login name)")
    parser.add_argument(
        "--token", help=f"the operator's token (default: ${TOKEN_ENV}, else derived from the master key)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="where master.key is (default: ./var)")
    parser.set_defaults(handler=handler)
    return parser


def card_uid(text: str) -> int:
    """A card uid from the command line: decimal, or hex with 0x.

    >>> card_uid("0x04A1"), card_uid("1185")
    (1185, 1185)
    """
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a card uid: {text!r} (decimal, or 0x... hex)") from None
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"card uid out of range: {text!r}")
    return value


def iso_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (YYYY-MM-DD)") from None


# --- credentials -------------------------------------------------------------------


def operator_name(args: argparse.Namespace) -> str:
    name = getattr(args, "operator", None) or os.environ.get(OPERATOR_ENV) or getpass.getuser()
    if not is_operator_name(name):
        raise CredentialsError(f"operator name must be 1 to 100 of A-Z a-z 0-9 . _ -, got {name!r}")
    return name


def operator_token(args: argparse.Namespace, operator: str) -> str:
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV)
    if token:
        return str(token)
    data_dir = args.data_dir if getattr(args, "data_dir", None) is not None else default_data_dir()
    try:
        return derive_operator_token(load_master_key(data_dir, create=False), operator)
    except MasterKeyError as error:
        raise CredentialsError(f"no operator token: give --token or set {TOKEN_ENV} ({error})") from None


def _client(args: argparse.Namespace) -> AdminClient:
    operator = operator_name(args)
    return AdminClient(args.admin_url, operator, operator_token(args, operator))


def _carry_out(
    args: argparse.Namespace,
    request: Callable[[AdminClient], dict[str, Any]],
    *,
    refused_when: Callable[[dict[str, Any]], bool] | None = None,
) -> int:
    """Send one request; print the answer (stdout) or the refusal (stderr)."""
    try:
        answer = request(_client(args))
    except CredentialsError as error:
        return _error(str(error), EXIT_USAGE)
    except AdminUnreachable as error:
        return _error(f"{error.message} (is the engine running with --admin?)", EXIT_FAILURE)
    except AdminError as error:
        refused = error.status is not None and 400 <= error.status < 500
        detail = f"{error.message} [{error.status} {error.code}]"
        return _error(detail, EXIT_REFUSED if refused else EXIT_FAILURE)
    print(orjson.dumps(answer).decode())
    return EXIT_REFUSED if refused_when is not None and refused_when(answer) else EXIT_OK


def _error(message: str, status: int) -> int:
    print(f"citycard: error: {message}", file=sys.stderr)
    return status


# --- commands --------------------------------------------------------------------------


def cmd_card_show(args: argparse.Namespace) -> int:
    return _carry_out(args, lambda client: client.show(args.uid))


def cmd_card_block(args: argparse.Namespace) -> int:
    return _carry_out(args, lambda client: client.block(args.uid, reason=args.reason))


def cmd_card_unblock(args: argparse.Namespace) -> int:
    return _carry_out(args, lambda client: client.unblock(args.uid))


def cmd_card_issue(args: argparse.Namespace) -> int:
    if args.holder is not None and args.birth_date is not None:
        return _error("--birth-date is for a new holder (--profile), not with --holder", EXIT_USAGE)
    return _carry_out(
        args,
        lambda client: client.issue(args.uid, holder_id=args.holder, profile=args.profile, birth_date=args.birth_date),
    )


def cmd_card_replace(args: argparse.Namespace) -> int:
    return _carry_out(args, lambda client: client.replace(args.old, args.new))


def cmd_card_topup(args: argparse.Namespace) -> int:
    seq = args.seq if args.seq is not None else time.time_ns() // 1000

    def request(client: AdminClient) -> dict[str, Any]:
        return client.topup(args.uid, args.amount_cents, terminal_id=args.terminal, terminal_seq=seq)

    # A declined top-up (a blocked card, the balance limit) exits like a declined tap.
    return _carry_out(args, _retry_hint(request, "--seq", seq), refused_when=_declined)


def cmd_card_sell(args: argparse.Namespace) -> int:
    return _carry_out(args, lambda client: client.sell_product(args.uid, args.product, valid_from=args.valid_from))


def cmd_card_debt_limit(args: argparse.Namespace) -> int:
    return _carry_out(args, lambda client: client.set_debt_limit(args.uid, args.debt_limit_cents))


def cmd_card_refund(args: argparse.Namespace) -> int:
    seq = args.desk_seq if args.desk_seq is not None else time.time_ns() // 1000

    def request(client: AdminClient) -> dict[str, Any]:
        return client.refund(args.terminal, args.seq, terminal_id=args.desk, terminal_seq=seq)

    # A declined refund (window passed, already refunded) exits like a declined tap.
    return _carry_out(args, _retry_hint(request, "--desk-seq", seq), refused_when=_declined)


def _declined(answer: dict[str, Any]) -> bool:
    return not answer.get("approved", False)


def _retry_hint(
    request: Callable[[AdminClient], dict[str, Any]], option: str, seq: int
) -> Callable[[AdminClient], dict[str, Any]]:
    """``request``, telling the operator which sequence to retry with when the outcome is not known."""

    def carried_out(client: AdminClient) -> dict[str, Any]:
        try:
            return request(client)
        except AdminError as error:
            if error.code in ("busy_retry", "outcome_pending"):
                error.message += f"; retry with {option} {seq}"
            raise

    return carried_out


def cmd_holder_eligibility(args: argparse.Namespace) -> int:
    return _carry_out(
        args,
        lambda client: client.set_eligibility(
            args.holder,
            profile=args.profile,
            source=args.source,
            valid_from=args.valid_from,
            valid_until=args.valid_until,
        ),
    )


def cmd_admin_token(args: argparse.Namespace) -> int:
    if not is_operator_name(args.name):
        return _error(f"operator name must be 1 to 100 of A-Z a-z 0-9 . _ -, got {args.name!r}", EXIT_USAGE)
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    try:
        master = load_master_key(data_dir, create=False)
    except MasterKeyError as error:
        return _error(str(error), EXIT_USAGE)
    print(derive_operator_token(master, args.name))
    return EXIT_OK
