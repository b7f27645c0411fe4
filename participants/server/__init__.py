"""The participant SDK's server: gRPC edge, registration, recovery, leases and inquiries.

A service author calls `run(service, argv)` (or builds a `ParticipantServer`) and gets a gRPC
server that implements dtm.v1.Participant and dtm.v1.ParticipantAdmin around their business
logic, plus the service's own read API, health checking and reflection.

Modules: `process` (ParticipantServer: serving, registration, recovery, leases, inquiries,
heuristic reports, checkpoints), `servicer` (Prepare, Commit, Rollback and the batched calls),
`admin` (the operator's ParticipantAdmin), `wire` (codes, metadata keys, request checks, the
refusal of a misdirected call), `settings` (ParticipantConfig from flags, file and
environment), `command` (`run`). Everything a service author uses is imported here.
"""

from __future__ import annotations

from dtm.core.branch import BranchState
from participants.branches import branch_key_text
from participants.server.command import (
    run,
)
from participants.server.process import (
    ParticipantServer,
)
from participants.server.settings import (
    ParticipantConfig,
    parse_args,
)
from participants.server.wire import (
    MISDIRECTED_METADATA_KEY,
    now_ms,
)

__all__ = [
    "MISDIRECTED_METADATA_KEY",
    "BranchState",
    "ParticipantConfig",
    "ParticipantServer",
    "branch_key_text",
    "now_ms",
    "parse_args",
    "run",
]
