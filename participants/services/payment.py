"""The payment participant: ChargePayment. Prepare holds the funds, commit captures them,
rollback releases them.

Per account: balance + held + captured == initial, always (there is no deposit operation yet).
`held` is exactly the sum of the holds of prepared branches, kept per branch key so that commit
and rollback move exactly what prepare moved, and so that a snapshot carries them across a
restart. Every capture is recorded with its order and transaction, so that "a confirmed order
has exactly one captured payment for its amount" can be checked from outside.

A free order (0 cents) has no payment branch: a charge of 0 is refused, INVALID_ARGUMENT.

Run: python -m participants.services.payment [SDK flags] [--initial PATH.json]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from dtm import limits
from dtmpb.v1 import shop_pb2, shop_pb2_grpc
from participants.service import (
    InvalidOperation,
    LockRequest,
    Prepared,
    PrepareResult,
    Refused,
    Service,
)
from participants.services import (
    Context,
    EncodedRows,
    check_resource_id,
    decode_state,
    page,
    state_pieces,
    transaction_of,
)
from participants.services.catalog import DEFAULT_CATALOG, AccountSpec, split_initial_arg


@dataclass(slots=True)
class AccountState:
    balance_cents: int
    held_cents: int
    captured_cents: int
    initial_cents: int
    declines: bool

    def to_pb(self, account_id: str) -> shop_pb2.Account:
        return shop_pb2.Account(
            account_id=account_id,
            balance_cents=self.balance_cents,
            held_cents=self.held_cents,
            captured_cents=self.captured_cents,
            initial_cents=self.initial_cents,
            declines=self.declines,
        )


@dataclass(frozen=True, slots=True)
class Hold:
    account_id: str
    amount_cents: int
    order_id: str


@dataclass(frozen=True, slots=True)
class Capture:
    order_id: str
    account_id: str
    amount_cents: int
    transaction_id: str

    def to_pb(self) -> shop_pb2.Capture:
        return shop_pb2.Capture(
            order_id=self.order_id,
            account_id=self.account_id,
            amount_cents=self.amount_cents,
            transaction_id=self.transaction_id,
        )


class PaymentService(Service[shop_pb2.ChargePayment]):
    name = "payment"
    operation_type = shop_pb2.ChargePayment

    def __init__(self, accounts: Mapping[str, AccountSpec] | None = None) -> None:
        initial = DEFAULT_CATALOG.accounts if accounts is None else accounts
        self.accounts: dict[str, AccountState] = {
            account_id: AccountState(
                balance_cents=spec.balance_cents,
                held_cents=0,
                captured_cents=0,
                initial_cents=spec.balance_cents,
                declines=spec.declines,
            )
            for account_id, spec in sorted(initial.items())
        }
        # Every account id, sorted: the first part of what ListAccounts pages through. Sorted
        # once: the set of accounts never changes after the start (no operation adds one).
        self.account_ids = list(self.accounts)
        # Branch key -> the funds that prepared branch holds.
        self.holds: dict[str, Hold] = {}
        # Every capture, in commit order. This is the ledger, the durable output of the
        # service, so it is kept whole; a real system would ship it to accounting and truncate.
        self.captures: list[Capture] = []
        self._captures_text = EncodedRows[Capture](
            lambda c: [c.order_id, c.account_id, c.amount_cents, c.transaction_id]
        )

    # ---- the branch operations ----

    def validate(self, operation: shop_pb2.ChargePayment) -> None:
        check_resource_id("account_id", operation.account_id)
        if operation.amount_cents == 0:
            # Refused rather than held as nothing: a capture of 0 would be a ledger line for
            # no money, and the invariant checker counts captures as charges.
            raise InvalidOperation(
                "amount_cents is 0: a free order has no payment branch (nothing to hold or "
                "capture); leave the payment branch out, as dtm.orderflow.order_request does"
            )
        if not 0 < operation.amount_cents <= limits.AMOUNT_CENTS_MAX:
            raise InvalidOperation(
                f"amount_cents must be between 1 and {limits.AMOUNT_CENTS_MAX}, "
                f"got {operation.amount_cents}"
            )
        check_resource_id("order_id", operation.order_id)

    def locks(self, operation: shop_pb2.ChargePayment) -> Sequence[LockRequest]:
        # No locks: this is an escrow design, like a card authorization. The hold itself
        # isolates concurrent charges: prepare checks the balance and moves the amount
        # balance -> held in one synchronous step on the single event-loop thread, so no other
        # branch can spend it, the balance never goes negative, and commit/rollback only touch
        # this branch's own hold. A per-account lock until the decision would serialize all of
        # a customer's concurrent orders for no extra safety.
        return []

    def prepare(self, key: str, operation: shop_pb2.ChargePayment) -> PrepareResult:
        if key in self.holds:
            # Already held for this branch: holding twice would take the money twice.
            return Prepared()
        account_id = operation.account_id
        account = self.accounts.get(account_id)
        if account is None:
            return Refused(f"unknown account {account_id}")
        if account.declines:
            return Refused(f"payment declined for account {account_id}")
        amount = operation.amount_cents
        if account.balance_cents < amount:
            return Refused(
                f"insufficient funds: account {account_id} has {account.balance_cents} cents "
                f"available, {amount} requested"
            )
        account.balance_cents -= amount
        account.held_cents += amount
        self.holds[key] = Hold(account_id, amount, operation.order_id)
        return Prepared()

    def commit(self, key: str, operation: shop_pb2.ChargePayment) -> None:
        # An unknown key holds nothing (the SDK only commits prepared branches); commit must
        # not fail, so there is nothing to do.
        hold = self.holds.pop(key, None)
        if hold is None:
            return
        account = self.accounts[hold.account_id]
        account.held_cents -= hold.amount_cents
        account.captured_cents += hold.amount_cents
        self.captures.append(
            Capture(hold.order_id, hold.account_id, hold.amount_cents, transaction_of(key))
        )
        self._captures_text.catch_up(self.captures)  # encoded now, not in a checkpoint's stall

    def rollback(self, key: str, operation: shop_pb2.ChargePayment) -> None:
        hold = self.holds.pop(key, None)
        if hold is None:
            return
        account = self.accounts[hold.account_id]
        account.held_cents -= hold.amount_cents
        account.balance_cents += hold.amount_cents

    # ---- state ----

    def snapshot(self) -> list[bytes]:
        return state_pieces(
            self.name,
            {
                "accounts": {
                    account_id: [
                        a.balance_cents,
                        a.held_cents,
                        a.captured_cents,
                        a.initial_cents,
                        a.declines,
                    ]
                    for account_id, a in self.accounts.items()
                },
                "holds": {
                    key: [h.account_id, h.amount_cents, h.order_id] for key, h in self.holds.items()
                },
            },
            # A list: the ledger's order is the commit order. Encoded row by row, once.
            {"captures": self._captures_text.pieces(self.captures)},
        )

    def restore(self, state: bytes) -> None:
        document = decode_state(self.name, state)
        accounts = {
            str(account_id): AccountState(int(b), int(h), int(c), int(i), bool(d))
            for account_id, (b, h, c, i, d) in sorted(document["accounts"].items())
        }
        holds = {
            str(key): Hold(str(account_id), int(amount), str(order_id))
            for key, (account_id, amount, order_id) in document["holds"].items()
        }
        for key, hold in holds.items():
            if hold.account_id not in accounts:
                raise ValueError(
                    f"payment snapshot: branch {key} holds funds of unknown account "
                    f"{hold.account_id!r}"
                )
        captures = [
            Capture(str(order_id), str(account_id), int(amount), str(transaction_id))
            for order_id, account_id, amount, transaction_id in document["captures"]
        ]
        # Replace only once everything parsed: a bad snapshot leaves the state as it was.
        self.accounts = accounts
        self.account_ids = list(accounts)
        self.holds = holds
        self.captures = captures
        self._captures_text.catch_up(captures)  # at start, not at the first commit

    # ---- reads ----

    def listing(self) -> shop_pb2.ListAccountsResponse:
        return shop_pb2.ListAccountsResponse(
            accounts=[self.accounts[a].to_pb(a) for a in self.account_ids],
            captures=[capture.to_pb() for capture in self.captures],
        )

    def add_read_api(self, server: grpc.aio.Server) -> list[str]:
        shop_pb2_grpc.add_PaymentServicer_to_server(PaymentReadApi(self), server)
        return [shop_pb2.DESCRIPTOR.services_by_name["Payment"].full_name]


class PaymentReadApi(shop_pb2_grpc.PaymentServicer):
    def __init__(self, service: PaymentService) -> None:
        self.service = service

    async def ListAccounts(
        self, request: shop_pb2.ListAccountsRequest, context: Context
    ) -> shop_pb2.ListAccountsResponse:
        service = self.service
        # One listing, the accounts then the captures, paged by one offset (see the proto): the
        # page's item numbers, first..last - 1, sliced out of the two lists.
        count = len(service.account_ids)

        def item(number: int) -> Message:
            if number < count:
                account_id = service.account_ids[number]
                return service.accounts[account_id].to_pb(account_id)
            return service.captures[number - count].to_pb()

        try:
            listed, token = page(
                range(count + len(service.captures)), item, request.page_size, request.page_token
            )
        except InvalidOperation as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return shop_pb2.ListAccountsResponse(
            accounts=[m for m in listed if isinstance(m, shop_pb2.Account)],
            captures=[m for m in listed if isinstance(m, shop_pb2.Capture)],
            next_page_token=token,
        )


def main(argv: list[str] | None = None) -> None:
    # Imported here: the business logic above is usable (and unit-tested) without the SDK.
    from dtm.config import configured_initial
    from participants.server import run

    # `initial` from the configuration file or DTM_*_INITIAL, unless --initial is given.
    catalog, rest = split_initial_arg(*configured_initial("payment", argv))
    run(PaymentService(catalog.accounts), rest)


if __name__ == "__main__":
    main()
