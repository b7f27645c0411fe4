"""The `dtm` CLI run in process, for tests that drive servers with it: its exit status and
output, and an order file for `dtm submit`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path

from dtm import cli


async def dtm(*args: str) -> tuple[int, str, str]:
    """Run `dtm ARGS...` on a worker thread; (exit status, stdout, stderr).

    Not capsys: the servers' logger keeps the stderr it first saw, and capsys closes its
    stream at the end of the test. The redirection is process-wide, which is fine: the
    servers log to the stream they already hold, never to sys.stdout/sys.stderr anew."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = await asyncio.to_thread(cli.main, list(args))
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return status, out.getvalue(), err.getvalue()


def order_file(path: Path, transaction_id: str, order_id: str, quantity: int = 1) -> Path:
    lines = [{"sku": "sku-apple" if quantity < 10 else "sku-scarce", "quantity": quantity}]
    document = {
        "transaction_id": transaction_id,
        "timeout_ms": 5000,
        "branches": [
            {
                "participant": "inventory",
                "type": "dtm.v1.ReserveStock",
                "operation": {"lines": lines},
            },
            {
                "participant": "orders",
                "type": "dtm.v1.CreateOrder",
                "operation": {
                    "order_id": order_id,
                    "customer_id": "cust-1",
                    "lines": lines,
                    "amount_cents": 700,
                },
            },
            {
                "participant": "payment",
                "type": "dtm.v1.ChargePayment",
                "operation": {
                    "account_id": "acct-alice",
                    "amount_cents": 700,
                    "order_id": order_id,
                },
            },
        ],
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path
