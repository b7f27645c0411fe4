"""The notification participant: SendNotification. Prepare stages the message, commit sends it
(appends it to the outbox), rollback drops it.

Nothing reaches the outbox before its transaction commits: prepare only stages. The outbox is
the service's durable "sent" list: it is state like any other, so the SDK's log replay (and its
checkpoints) make it survive crashes, and a commit replayed during recovery appends exactly the
message it appended before the crash, no more. The outbox is kept whole because it is the
output the invariants are checked against; a real system would ship it to a mail or push relay
and truncate what was delivered.

Run: python -m participants.services.notification [SDK flags] [--initial PATH.json (ignored)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from dtmpb.v1 import shop_pb2, shop_pb2_grpc
from participants.service import InvalidOperation, LockRequest, Prepared, PrepareResult, Service
from participants.services import (
    Context,
    EncodedRows,
    check_resource_id,
    check_text,
    decode_state,
    page,
    state_pieces,
    transaction_of,
)
from participants.services.catalog import split_initial_arg


@dataclass(frozen=True, slots=True)
class StagedMessage:
    order_id: str
    recipient: str
    body: str


@dataclass(frozen=True, slots=True)
class Sent:
    order_id: str
    recipient: str
    body: str
    transaction_id: str

    def to_pb(self) -> shop_pb2.SentNotification:
        return shop_pb2.SentNotification(
            order_id=self.order_id,
            recipient=self.recipient,
            body=self.body,
            transaction_id=self.transaction_id,
        )


def check_recipient(recipient: str) -> None:
    """Raise InvalidOperation unless `recipient` can name one addressee: not blank, and one
    line of printable characters. A line break in it would, in a mail header, add headers
    ("Bcc: ...") and so recipients that the order never named."""
    check_text("recipient", recipient, required=True)
    if not recipient.strip():
        raise InvalidOperation("recipient is blank: give the address to notify")
    if not recipient.isprintable():
        raise InvalidOperation(
            f"recipient {recipient[:40]!r} holds a line break or another unprintable "
            "character: give one address, on one line"
        )


class NotificationService(Service[shop_pb2.SendNotification]):
    name = "notification"
    operation_type = shop_pb2.SendNotification

    def __init__(self) -> None:
        # Branch key -> the message that prepared branch staged.
        self.staged: dict[str, StagedMessage] = {}
        # Sent messages, in commit order.
        self.outbox: list[Sent] = []
        self._outbox_text = EncodedRows[Sent](
            lambda s: [s.order_id, s.recipient, s.body, s.transaction_id]
        )

    # ---- the branch operations ----

    def validate(self, operation: shop_pb2.SendNotification) -> None:
        check_resource_id("order_id", operation.order_id)
        check_recipient(operation.recipient)
        check_text("body", operation.body, required=False)

    def locks(self, operation: shop_pb2.SendNotification) -> Sequence[LockRequest]:
        # No locks: a staged message belongs to its branch alone and shares nothing with other
        # branches (no counter, no id that must be unique), so there is nothing to isolate.
        return []

    def prepare(self, key: str, operation: shop_pb2.SendNotification) -> PrepareResult:
        # Staging cannot fail; re-staging the same branch replaces it with the same message.
        self.staged[key] = StagedMessage(operation.order_id, operation.recipient, operation.body)
        return Prepared()

    def commit(self, key: str, operation: shop_pb2.SendNotification) -> None:
        # An unknown key staged nothing (the SDK only commits prepared branches); commit must
        # not fail, and must not send a message twice, so there is nothing to do.
        message = self.staged.pop(key, None)
        if message is not None:
            self.outbox.append(
                Sent(message.order_id, message.recipient, message.body, transaction_of(key))
            )
            self._outbox_text.catch_up(self.outbox)  # encoded now, not in a checkpoint's stall

    def rollback(self, key: str, operation: shop_pb2.SendNotification) -> None:
        self.staged.pop(key, None)

    # ---- state ----

    def snapshot(self) -> list[bytes]:
        return state_pieces(
            self.name,
            {
                "staged": {
                    key: [m.order_id, m.recipient, m.body] for key, m in self.staged.items()
                },
            },
            # A list: the outbox's order is the commit order. Encoded row by row, once.
            {"outbox": self._outbox_text.pieces(self.outbox)},
        )

    def restore(self, state: bytes) -> None:
        document = decode_state(self.name, state)
        staged = {
            str(key): StagedMessage(str(order_id), str(recipient), str(body))
            for key, (order_id, recipient, body) in document["staged"].items()
        }
        outbox = [
            Sent(str(order_id), str(recipient), str(body), str(transaction_id))
            for order_id, recipient, body, transaction_id in document["outbox"]
        ]
        # Replace only once everything parsed: a bad snapshot leaves the state as it was.
        self.staged = staged
        self.outbox = outbox
        self._outbox_text.catch_up(outbox)  # at start, not at the first commit

    # ---- reads ----

    def listing(self) -> shop_pb2.ListSentResponse:
        return shop_pb2.ListSentResponse(
            sent=[sent.to_pb() for sent in self.outbox], staged=len(self.staged)
        )

    def add_read_api(self, server: grpc.aio.Server) -> list[str]:
        shop_pb2_grpc.add_NotificationServicer_to_server(NotificationReadApi(self), server)
        return [shop_pb2.DESCRIPTOR.services_by_name["Notification"].full_name]


class NotificationReadApi(shop_pb2_grpc.NotificationServicer):
    def __init__(self, service: NotificationService) -> None:
        self.service = service

    async def ListSent(
        self, request: shop_pb2.ListSentRequest, context: Context
    ) -> shop_pb2.ListSentResponse:
        try:
            sent, token = page(
                self.service.outbox, Sent.to_pb, request.page_size, request.page_token
            )
        except InvalidOperation as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return shop_pb2.ListSentResponse(
            sent=sent, staged=len(self.service.staged), next_page_token=token
        )


def main(argv: list[str] | None = None) -> None:
    # Imported here: the business logic above is usable (and unit-tested) without the SDK.
    from participants.server import run

    # Accepted for a uniform command line; notification starts empty.
    _, rest = split_initial_arg(argv)
    run(NotificationService(), rest)


if __name__ == "__main__":
    main()
