"""Loyalty: awards points for a confirmed order, refused while the member is frozen."""

import json
from dataclasses import dataclass, field

import loyalty_pb2  # python -m grpc_tools.protoc -I. --python_out=. loyalty.proto
from google.protobuf import any_pb2

from dtm.config import about, integer
from dtm.orderflow import order_request
from dtmpb.v1 import coordinator_pb2
from participants.server import run
from participants.service import InvalidOperation, Prepared, Refused, Service

MEMBERS = {"m-alice": False, "m-bob": False, "m-frozen": True}  # member -> frozen


@dataclass(frozen=True)
class LoyaltySettings:  # [loyalty] in the file, DTM_LOYALTY_MAX_POINTS, --max-points
    max_points: int = field(
        default=1_000, metadata=about(integer(1, 1_000_000), "most points one order may award")
    )


class Loyalty(Service[loyalty_pb2.AwardPoints]):
    name = "loyalty"  # registered under it: a branch names it as its participant
    operation_type = loyalty_pb2.AwardPoints
    settings_type = LoyaltySettings  # run() reads them, then calls configure

    def __init__(self) -> None:
        self.settings = LoyaltySettings()
        self.points = dict.fromkeys(MEMBERS, 0)
        self.awards: dict[str, tuple[str, int]] = {}  # branch key -> prepared award

    def configure(self, settings: LoyaltySettings) -> None:
        self.settings = settings

    def validate(self, op: loyalty_pb2.AwardPoints) -> None:  # before prepare: bad input
        if not op.member_id or op.points <= 0:
            raise InvalidOperation("member_id is required and points must be > 0")
        # A setting is read here, at a branch's first Prepare only: a replay never sees it.
        if op.points > self.settings.max_points:
            raise InvalidOperation(f"at most {self.settings.max_points} points per order")

    # No locks(): points are a quantity, held per branch (escrow). A lock on the member, held
    # until the decision, would refuse every other order of that member meanwhile.
    def prepare(self, key: str, op: loyalty_pb2.AwardPoints) -> Prepared | Refused:
        if op.member_id not in self.points:
            return Refused(f"unknown member {op.member_id}")
        if MEMBERS[op.member_id]:
            return Refused(f"member {op.member_id} is frozen")
        self.awards[key] = (op.member_id, op.points)
        return Prepared()

    def commit(self, key: str, op: loyalty_pb2.AwardPoints) -> None:
        member, points = self.awards.pop(key)
        self.points[member] += points

    def rollback(self, key: str, op: loyalty_pb2.AwardPoints) -> None:
        self.awards.pop(key)

    def snapshot(self) -> bytes:  # everything, prepared awards included
        return json.dumps({"points": self.points, "awards": self.awards}).encode()

    def restore(self, state: bytes) -> None:
        document = json.loads(state)
        self.points = document["points"]
        self.awards = {
            key: (member, points) for key, (member, points) in document["awards"].items()
        }


def order_with_points(order_id: str, member_id: str, points: int) -> coordinator_pb2.SubmitRequest:
    """A shop order (dtm.orderflow) with a fifth branch, for OrderClient(...).submit."""
    request = order_request(
        order_id, "cust-alice", "acct-alice", [("sku-apple", 1)], 350, "a@x.org"
    )
    award = any_pb2.Any()
    award.Pack(loyalty_pb2.AwardPoints(member_id=member_id, order_id=order_id, points=points))
    request.branches.append(coordinator_pb2.BranchRequest(participant="loyalty", operation=award))
    return request


if __name__ == "__main__":
    run(Loyalty())  # --listen, --coordinator, --data-dir...: see --help
