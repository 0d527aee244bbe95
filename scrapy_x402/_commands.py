"""``scrapy x402 settle [--dry-run]``, ``scrapy x402 report [--json]``, ``scrapy x402 keys``."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError
from scrapy.utils.log import configure_logging

from scrapy_x402._assets import CLOUDFLARE
from scrapy_x402._botauth import load_identity
from scrapy_x402._config import X402Config
from scrapy_x402._recovery import resolve_in_doubt
from scrapy_x402._settlement import Settler
from scrapy_x402._wallet import WalletError, load_account
from scrapy_x402._webbotauth import DIRECTORY_PATH, BotIdentity, IdentityError
from scrapy_x402.ledger import Ledger, Status, open_ledger
from scrapy_x402.payments import PaymentBook

if TYPE_CHECKING:
    import argparse

    from scrapy_x402._assets import AssetTable

# What the report calls each ledger status. "held": signed transfers not confirmed, that
# could still be collected until they expire.
BUCKETS = {
    Status.ACCEPTED: "owed",
    Status.SETTLING: "owed",
    Status.SETTLED: "settled",
    Status.HELD: "held",
    Status.RESERVED: "reserved",
    Status.REJECTED: "refused",
    Status.FAILED: "refused",
    Status.EXPIRED: "refused",
}
MONEY_BUCKETS = ("owed", "settled", "held")
STATEMENT_FIELDS = (
    "date",
    "domain",
    "url",
    "amount_usd",
    "receipt_timestamp",
    "status",
    "invoice",
    "payment_id",
)


class X402Command(ScrapyCommand):
    requires_project = False
    requires_crawler_process = False
    default_settings = {"LOG_LEVEL": "INFO"}

    def syntax(self) -> str:
        return (
            "settle [--dry-run] [--invoice REF --period YYYY-MM] | "
            "report [--json] [--statement YYYY-MM] | keys --agent URL [--key-file PATH]"
        )

    def short_desc(self) -> str:
        return (
            "Settle owed x402 payments on-chain, report payments per payee and domain, "
            "or make a Web Bot Auth key and its directory"
        )

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.add_argument(
            "--dry-run", action="store_true", help="settle: print what would be paid, send nothing"
        )
        parser.add_argument("--json", action="store_true", help="report: print JSON")
        parser.add_argument(
            "--statement",
            metavar="YYYY-MM",
            help="report: Cloudflare's charges of that month (UTC), as CSV (or JSON with --json)",
        )
        parser.add_argument(
            "--invoice",
            metavar="REF",
            help="settle: mark the --period's Cloudflare charges paid by this invoice",
        )
        parser.add_argument("--period", metavar="YYYY-MM", help="settle --invoice: the month (UTC)")
        parser.add_argument(
            "--resolve-in-doubt",
            action="store_true",
            help="settle: no crawl is running: ask publishers about every payment a crash left "
            "reserved, expired or not (by default only expired ones)",
        )
        parser.add_argument("--ledger", metavar="URI", help="ledger URI (default: X402_LEDGER_URI)")
        parser.add_argument(
            "--agent",
            metavar="URL",
            help="keys: the https URL that will host the key directory (default: X402_SIGNATURE_AGENT)",
        )
        parser.add_argument(
            "--key-file",
            metavar="PATH",
            default="x402-bot-key.jwk",
            help="keys: where a new private key is written (mode 600) when X402_BOT_AUTH_KEY is unset",
        )

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if len(args) != 1 or args[0] not in ("settle", "report", "keys"):
            raise UsageError("expected `settle`, `report` or `keys`")
        assert self.settings is not None
        # Without a crawler process Scrapy sets up no logging: settlement errors would vanish.
        configure_logging(self.settings)
        config = X402Config.from_settings(self.settings)
        if args[0] == "keys":
            print(_keys(config, opts.agent or config.signature_agent, Path(opts.key_file)))
            return
        ledger = open_ledger(opts.ledger or config.ledger_uri)
        try:
            if args[0] == "settle" and opts.invoice:
                print(_settle_invoice(PaymentBook(ledger), opts.invoice, opts.period))
            elif args[0] == "settle":
                self.exitcode = _settle(
                    PaymentBook(ledger), config, opts.dry_run, opts.resolve_in_doubt
                )
            elif opts.statement:
                print(_statement(ledger, opts.statement, opts.json))
            else:
                print(
                    _report_json(ledger, config.assets)
                    if opts.json
                    else _report_table(ledger, config.assets)
                )
        finally:
            ledger.close()


def _keys(config: X402Config, agent: str | None, key_file: Path) -> str:
    """The configured Web Bot Auth key (or a new one, written to ``key_file``) and what to
    host for it. The private key is never printed."""
    if agent is None or not agent.startswith("https://"):
        raise UsageError("give the https URL that will host the directory: --agent https://...")
    try:
        existing = load_identity(config)
        identity = existing or BotIdentity.generate(agent=agent)
    except IdentityError as e:  # the key, or an agent that is not printable ASCII
        raise UsageError(str(e)) from None
    body, headers = identity.directory(urlsplit(agent).netloc)
    parts = []
    if existing is None:
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(
                f"{key_file} exists; set X402_BOT_AUTH_KEY={key_file} to use it"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(identity.private_jwk(), f)
        parts += [
            f"# New Ed25519 key written to {key_file} (mode 600): set X402_BOT_AUTH_KEY to it.",
            "",
        ]
    parts += [
        f"# keyid (JWK SHA-256 thumbprint): {identity.keyid}",
        "# JWKS:",
        json.dumps({"keys": [identity.public_jwk()]}),
        "",
        f"# Host this at {agent.rstrip('/')}{DIRECTORY_PATH}",
        "# with these response headers (the signature expires in a day: regenerate it daily):",
        *(f"{name}: {value}" for name, value in headers.items()),
        "",
        body.decode(),
        "",
        "# Then set X402_SIGNATURE_AGENT to that URL and register it with Cloudflare.",
    ]
    return "\n".join(parts)


def _period(text: str | None) -> tuple[int, int]:
    """A calendar month, UTC, as [start, end) unix times."""
    try:
        start = datetime.datetime.strptime(text or "", "%Y-%m").replace(
            tzinfo=datetime.timezone.utc
        )
    except ValueError:
        raise UsageError(f"a period is a month, YYYY-MM, not {text!r}") from None
    end = (start + datetime.timedelta(days=32)).replace(day=1)
    return int(start.timestamp()), int(end.timestamp())


def _iso(timestamp: Any) -> str:
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()


def _statement(ledger: Ledger, period: str, as_json: bool) -> str:
    """Cloudflare's charges for a month, to reconcile against its invoice."""
    lines = [
        {
            "date": _iso(line.created_at),
            "domain": line.domain,
            "url": line.url,
            "amount_usd": str(line.usd),
            "receipt_timestamp": _iso(line.receipt.get("timestamp")),
            "status": "settled" if line.status == Status.SETTLED else "owed",
            "invoice": (line.settled_by or "").removeprefix("invoice:"),
            "payment_id": line.id,
        }
        for line in ledger.statement(CLOUDFLARE, *_period(period))
    ]
    total = sum((Decimal(line["amount_usd"]) for line in lines), Decimal(0))
    if as_json:
        return json.dumps(
            {"network": CLOUDFLARE, "period": period, "total_usd": str(total), "lines": lines},
            indent=2,
        )
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(STATEMENT_FIELDS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    return out.getvalue().rstrip("\n")


def _settle_invoice(book: PaymentBook, invoice: str, period: str | None) -> str:
    lines = book.store.statement(CLOUDFLARE, *_period(period))
    owed = [line for line in lines if line.status == Status.ACCEPTED]
    marked = book.invoice(CLOUDFLARE, *_period(period), invoice)
    total = sum((line.usd for line in owed), Decimal(0))
    return f"Marked {marked} Cloudflare charges of {period} ({total} USD) settled by invoice {invoice}."


def _settle(
    book: PaymentBook, config: X402Config, dry_run: bool, all_in_doubt: bool = False
) -> int:
    try:
        account = load_account(config)
    except WalletError as e:
        raise UsageError(str(e)) from None
    if account is None:
        raise UsageError("no wallet key: set X402_PRIVATE_KEY or X402_KEYSTORE_PATH")
    if not dry_run:
        resolution = resolve_in_doubt(
            book, expired_before=None if all_in_doubt else int(time.time())
        )
        if resolution.accepted or resolution.refused or resolution.held or resolution.unknown:
            print(
                f"In doubt after a crash: {len(resolution.accepted)} served (now owed), "
                f"{len(resolution.refused)} not served, {len(resolution.held)} held until "
                f"they expire, {len(resolution.unknown)} still unknown."
            )
    outcomes = Settler.from_config(book, account, config).settle(dry_run=dry_run)
    if not outcomes:
        print("Nothing is owed on-chain.")
        return 0
    print(
        _table(
            ["status", "network", "payee", "amount", "payments", "transaction / reason"],
            [
                [
                    o.status,
                    o.network,
                    o.payee,
                    _amount(config.assets, o.network, o.asset, o.amount),
                    str(o.payment_count),
                    o.tx_hash or o.reason or "",
                ]
                for o in outcomes
            ],
        )
    )
    # Reverted and replaced transfers were not paid (their payments are owed again).
    return (
        1 if any(o.status in ("failed", "pending", "reverted", "replaced") for o in outcomes) else 0
    )


def _report_rows(ledger: Ledger, assets: AssetTable) -> list[dict[str, Any]]:
    """Per (payee, domain, network, asset, scheme): pages and amounts by what became of them."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in ledger.summary():
        key = (r.payee, r.domain, r.network, r.asset, r.scheme)
        row = rows.setdefault(
            key,
            {
                "payee": r.payee,
                "domain": r.domain,
                "network": r.network,
                "asset": r.asset,
                "symbol": _symbol(assets, r.network, r.asset),
                "scheme": r.scheme,
                **{f"{b}_pages": 0 for b in (*MONEY_BUCKETS, "reserved", "refused")},
                **{f"{b}_amount": 0 for b in MONEY_BUCKETS},
                **{f"{b}_usd": Decimal(0) for b in MONEY_BUCKETS},
            },
        )
        bucket = BUCKETS[r.status]
        row[f"{bucket}_pages"] += r.count
        if bucket in MONEY_BUCKETS:
            row[f"{bucket}_amount"] += r.amount
            row[f"{bucket}_usd"] += r.usd
    return [rows[k] for k in sorted(rows)]


def _report_json(ledger: Ledger, assets: AssetTable) -> str:
    settlements = [
        {
            "transaction": s.id,
            "status": s.status,
            "network": s.network,
            "asset": s.asset,
            "payee": s.payee,
            "amount": str(s.amount),
            "payments": s.payment_count,
            "reason": s.reason,
        }
        for s in ledger.settlements()
    ]
    rows = [
        {k: str(v) if isinstance(v, (Decimal, int)) else v for k, v in row.items()}
        for row in _report_rows(ledger, assets)
    ]
    return json.dumps({"payments": rows, "settlements": settlements}, indent=2)


def _report_table(ledger: Ledger, assets: AssetTable) -> str:
    rows = _report_rows(ledger, assets)
    if not rows:
        return "The ledger holds no payments."
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        totals["owed"] += row["owed_usd"]
        totals["settled"] += row["settled_usd"]
    table = _table(
        [
            "payee",
            "domain",
            "network",
            "scheme",
            "paid pages",
            "owed",
            "settled",
            "held",
            "USD owed",
            "USD settled",
            "refused",
        ],
        [
            [
                row["payee"],
                row["domain"],
                row["network"],
                row["scheme"],
                str(row["owed_pages"] + row["settled_pages"]),
                *(
                    _amount(assets, row["network"], row["asset"], row[f"{b}_amount"])
                    for b in MONEY_BUCKETS
                ),
                str(row["owed_usd"]),
                str(row["settled_usd"]),
                str(row["refused_pages"]),
            ]
            for row in rows
        ],
    )
    lines = [table, f"Total: {totals['owed']} USD owed, {totals['settled']} USD settled."]
    settlements = ledger.settlements()
    if settlements:
        lines.append("")
        lines.append(
            _table(
                ["transaction", "status", "payee", "amount", "payments"],
                [
                    [
                        s.id,
                        s.status,
                        s.payee,
                        _amount(assets, s.network, s.asset, s.amount),
                        str(s.payment_count),
                    ]
                    for s in settlements
                ],
            )
        )
    return "\n".join(lines)


def _symbol(assets: AssetTable, network: str, address: str) -> str:
    asset = assets.get(network, address)
    return asset.symbol if asset else address


def _amount(assets: AssetTable, network: str, address: str, amount: int) -> str:
    asset = assets.get(network, address)
    return asset.format(amount) if asset else f"{amount} units"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
