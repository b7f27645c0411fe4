"""The bounds of the system (TigerBeetle style: put a limit on everything), all but the few kept
next to the one piece of code they bound (README names them).

Requests beyond a bound are refused with a precise status; internal queues and loops are
bounded by these numbers and asserted against them.
"""

from __future__ import annotations

import ipaddress
import re

# ---- identifiers ----
TRANSACTION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
PARTICIPANT_NAME_PATTERN = re.compile(r"[a-z0-9_\-]{1,64}")
# A participant's incarnation (RegisterParticipantRequest.incarnation): the SDK makes 16 hex
# characters; another implementation may choose its own, within this.
INCARNATION_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# The participant SDK's flag that sets RegisterParticipantRequest.replace for one start: the
# coordinator names it when it refuses another incarnation under an owed name.
REPLACE_REGISTRATION_FLAG = "--replace-registration"
ADDRESS_LENGTH_MAX = 256
# The port of a host:port address (or of a gRPC target such as dns:///name:port or
# [fe80::1%eth0]:port): ASCII digits ("²".isdigit() is true, int("²") fails).
PORT_PATTERN = re.compile(r"[0-9]{1,5}")
RESOURCE_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@\-]{1,128}")

# ---- requests ----
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
# What an answer cut to fit one message (a list, a SubmitBatch) may take: room is kept for
# gRPC's own framing.
ANSWER_BYTES_MAX = MESSAGE_BYTES_MAX - 64 * 1024
# What an element of a repeated message field adds to its own size: a tag and a length.
REPEATED_ELEMENT_FRAMING_BYTES = 6
BRANCHES_PER_TRANSACTION_MAX = 32
OPERATION_BYTES_MAX = 64 * 1024
# An operation's type URL ("type.googleapis.com/dtm.v1.ReserveStock"): ASCII, and far
# longer than any real one. Unbounded, it made an operation as large as the whole request.
TYPE_URL_CHARS_MAX = 512
# Transactions in one SubmitBatch call. Its answer must fit MESSAGE_BYTES_MAX too: 256 answers
# of 32 branches leave each branch's status about 500 bytes.
SUBMIT_BATCH_MAX = 256
# A transaction's fingerprint, as a participant receives it in a Prepare and keeps it with the
# branch (the coordinator sends 16 bytes); bounded because 100,000 decided branches keep theirs.
TRANSACTION_FINGERPRINT_BYTES_MAX = 64
LINES_PER_OPERATION_MAX = 100
QUANTITY_MAX = 1_000_000
AMOUNT_CENTS_MAX = 10**12
TEXT_FIELD_LENGTH_MAX = 1024
# What the coordinator keeps of a participant's reason or error: answered to the client for each
# of up to 32 branches, within MESSAGE_BYTES_MAX.
REASON_CHARS_MAX = 1024
PARTICIPANTS_MAX = 256
# The participants a summary log line names (the coordinator's "coordinator stopping": the
# busiest, by calls); a field for each registered one made a line of up to 256 fields.
LOG_PARTICIPANTS_NAMED_MAX = 8
# Operation types one participant declares: the whole registry (PARTICIPANTS_MAX of them) is one
# checkpoint record, and one ListParticipants answer (`dtm participants`).
OPERATION_TYPES_MAX = 16
# The name of one operation type a participant declares: Submit compares it with what follows
# the last "/" of a type URL, itself at most TYPE_URL_CHARS_MAX, so a longer one could never
# match. At TEXT_FIELD_LENGTH_MAX, a full registry of 256 x 16 of them listed in 4.3 MB, over
# MESSAGE_BYTES_MAX, and ListParticipants failed; at this bound it takes 2.2 MB.
OPERATION_TYPE_CHARS_MAX = TYPE_URL_CHARS_MAX

# ---- time ----
PREPARE_TIMEOUT_MS_DEFAULT = 2_000
TRANSACTION_TIMEOUT_MS_DEFAULT = 10_000
TRANSACTION_TIMEOUT_MS_MAX = 600_000
PHASE_TWO_CALL_TIMEOUT_MS = 2_000
PHASE_TWO_BACKOFF_MS_MIN = 50
PHASE_TWO_BACKOFF_MS_MAX = 5_000

# ---- concurrency and memory ----
TRANSACTIONS_IN_FLIGHT_MAX = 10_000
# Submits that wait for a transaction under their id to answer (a retry joining it, or another
# attempt waiting for it to end): not counted as transactions in flight, and each holds its
# call and its request (up to MESSAGE_BYTES_MAX) until then.
SUBMITS_WAITING_PER_TRANSACTION_MAX = 64
# Calls a server's gRPC core holds for it before the server's code takes them (its event loop
# is busy): gRPC's own bound (grpc.server.max_pending_requests, 1,000 by default, and a hard
# limit of 3,000) cancelled a burst beyond it inside gRPC, CANCELLED with no message and no
# line logged, before any bound of ours was reached (a burst of 3,000 Submits lost 763 that
# way). Above the transactions in flight, so that that bound answers first, with a precise
# status. The coordinator's calls to one participant stay far below gRPC's default too
# (UNARY_CALLS_IN_FLIGHT_MAX), for a participant outside the project, which keeps it.
CALLS_PENDING_MAX = 2 * TRANSACTIONS_IN_FLIGHT_MAX
# Finished transactions the coordinator remembers (for GetTransaction and retried Submits); a
# retry of an older one is still never applied twice: the participants remember their branches.
FINISHED_TRANSACTIONS_KEPT = 20_000
BRANCHES_DECIDED_KEPT = 100_000
# Heuristic outcomes the coordinator keeps until an operator forgets them. Beyond, the oldest
# is dropped with an ERROR line (its WARNING line and log record stay the trace): a bound on
# memory and on the checkpoint, far above what an operator would let pile up.
HEURISTICS_KEPT_MAX = 10_000
#: How long a participant's question before an operator's force (or forget with
#: coordinator_lost) waits for its coordinator: a coordinator that takes longer counts as
#: unreachable and lets the override go unchecked, so this is as patient as `dtm force`'s own
#: check (the CLI's default --timeout), not the housekeeping inquiry's second, which a live but
#: busy coordinator can miss. `dtm force` and `dtm branches forget` give their call at least
#: this long and FORCE_CALL_MARGIN_S more (a forget may report a contradiction after it).
FORCE_CHECK_TIMEOUT_S = 5.0
FORCE_CALL_MARGIN_S = 2.0
LIST_TRANSACTIONS_LIMIT_DEFAULT = 100
LIST_TRANSACTIONS_LIMIT_MAX = 1_000
# Connections the /metrics endpoint serves at once, each on its own thread; one more is closed
# at once. A scraper or two need one each; without a bound, silent connections (held up to
# dtm.metrics.HANDSHAKE_TIMEOUT_S each) took the process's threads and file descriptors.
METRICS_CONNECTIONS_MAX = 16

# ---- log ----
LOG_RECORD_BYTES_MAX = 8 * 1024 * 1024
# Record types live in a u32 field, but callers only need small numbers; a tight bound catches a
# caller passing a length or an LSN by mistake.
RECORD_TYPE_MAX = 0xFFFF
# One checkpoint is the live state of one process: bounded like every other batch.
CHECKPOINT_RECORDS_MAX = 1_000_000
# A participant checkpoint is written in records of at most this size: a service's state and
# the window of decided branches together grow past one record's limit (orders, at about
# 70,000 orders).
CHECKPOINT_PART_BYTES = 4 * 1024 * 1024
LOG_SEGMENT_BYTES_MAX = 64 * 1024 * 1024
BATCH_ITEMS_MAX = 1_024
# Decisions waiting for one participant: the items queued for it (a batched participant;
# prepares count too), or its unary calls in flight or waiting for one of the
# UNARY_CALLS_IN_FLIGHT_MAX slots (a unary one; prepares count too). Commits are bounded by
# the transactions in flight, which wait for them; Rollbacks are not (an aborted transaction
# is over at once), so a participant that hangs while aborts go on would grow the queue
# without end. Beyond it a decision fails at once and is retried later like a failed call
# (a Rollback gives up after a few: presumed abort, the participant's inquiry resolves it).
DECISIONS_WAITING_MAX = 16 * BATCH_ITEMS_MAX
# Unary calls (Prepare, Commit, Rollback) in flight from the coordinator to one participant
# that does not batch; the next waits for one to end, a Prepare no longer than its deadline.
# Unbounded, each Prepare and decision was a call at once: 10,000 transactions in flight could
# put 320,000 calls on one participant, and its server's gRPC queue (1,000 calls by default,
# all a participant outside the project can be assumed to keep; see CALLS_PENDING_MAX)
# cancelled the rest itself, CANCELLED: each such Prepare aborted its transaction. Well below
# that default, so the participant's other callers (another coordinator, a port of it still
# draining after it registered again) fit too. Measured with bench --unary-participants
# (docs/architecture.md, section 11): never reached at 64 clients (at most 102-129 calls in
# flight to one participant); 64, 1,024, and serving decisions before prepares, made no
# difference beyond the noise of the machine at 64 or 256 clients.
UNARY_CALLS_IN_FLIGHT_MAX = 256
# The coordinator's Exchange to one participant: the message limit, less room for the framing
# its estimate of each item's size leaves out (a few bytes per item, 1,024 items at most).
EXCHANGE_BYTES_MAX = MESSAGE_BYTES_MAX - 64 * 1024
INQUIRIES_PER_TICK_MAX = 256
# The bound on one resource's lock wait queue; a request beyond it is refused at once.
WAITERS_PER_RESOURCE_MAX = 1_024
# Transactions a batching OrderClient queues while its SubmitBatch calls are in flight: what
# the next four calls carry. Each holds its request (batched only up to about 16 KB) and its
# caller; beyond, a submit is answered RESOURCE_EXHAUSTED at once, unsent. Unbounded, the
# queue grew with callers x their timeout behind a slow coordinator.
CLIENT_SUBMITS_QUEUED_MAX = 4 * SUBMIT_BATCH_MAX
# One ListLocks answer (`dtm locks`): the longest-held locks, and of each the first holders and
# the first waiters, with the totals. Worst case with the shipped services (128-character ids):
# 1,000 locks of 134 + 8 x 134 + 8 x 146 bytes, 2.4 MB, within MESSAGE_BYTES_MAX. Unbounded,
# 16,000 such locks took 4.5 MB and the call failed (RESOURCE_EXHAUSTED) with nothing shown.
LOCKS_LISTED_MAX = 1_000
LOCK_OWNERS_LISTED_MAX = 8


def address_port(address: str) -> int | None:
    """The port of a well-formed host:port address (no whitespace or control character
    anywhere; an IPv6 host in brackets), else None."""
    if len(address) > ADDRESS_LENGTH_MAX or not address.isprintable() or " " in address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not PORT_PATTERN.fullmatch(port) or _unbracketed(host):
        return None
    return int(port)


def is_wildcard(address: str) -> bool:
    """Whether a host:port listen address names every interface (0.0.0.0, [::]): a socket
    can be bound to it, but it is no address for another process to dial."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name, not an address
        return False


def unbracketed_host_hint(address: str) -> str:
    """What to add to the refusal of `address` when its host has a ':' outside brackets (an
    IPv6 address without them, or a port given twice), or when it is a bracketed IPv6 address
    with no port at all (its last ':' is inside the brackets): the right form; else ""."""
    if _BRACKETED.fullmatch(_TARGET_SCHEME.sub("", address, 1)):
        return "; no port after the brackets: [ADDRESS]:PORT, as [::1]:50050"
    host, _, port = address.rpartition(":")
    if not _unbracketed(host):
        return ""
    bare = _TARGET_SCHEME.sub("", host, 1)
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        return f"; {bare!r} has a ':' (a port given twice?); an IPv6 address goes in brackets"
    return f"; an IPv6 address goes in brackets: [{bare}]:{port}"


# The scheme of a gRPC target before its host:port: dns:///name:port, dns://resolver/name:port,
# ipv4:a.b.c.d:port, ipv6:[address]:port.
_TARGET_SCHEME = re.compile(r"^(?:dns:(?://[^/]*/)?|ipv4:|ipv6:)")
_BRACKETED = re.compile(r"\[[^\[\]]+\]")


def _unbracketed(host: str) -> bool:
    """Whether a ':' in `host` (scheme aside) is outside brackets: `::1:5` is the address ::1
    and port 5, or the address ::1:5 and no port; `host:1:2` has two ports. gRPC would take a
    guess; the right form ([::1]:5) leaves none to take."""
    host = _TARGET_SCHEME.sub("", host, 1)
    return ":" in host and not _BRACKETED.fullmatch(host)


def participant_name_problem(name: str) -> str | None:
    """What is wrong with a participant's name, or None."""
    if not PARTICIPANT_NAME_PATTERN.fullmatch(name):
        return f"participant name {name[:80]!r} is malformed: 1..64 characters of [a-z0-9_-]"
    return None


def incarnation_problem(incarnation: str) -> str | None:
    """What is wrong with a participant's incarnation, or None (empty: not given)."""
    if incarnation and not INCARNATION_PATTERN.fullmatch(incarnation):
        return f"incarnation {incarnation[:80]!r} is malformed: 1..64 characters of [A-Za-z0-9_-]"
    return None


def addressing_problem(participant: str, incarnation: str) -> str | None:
    """What is wrong with the form of the participant and incarnation a call names, or None
    (empty: not given): a Participant call the coordinator sends, a participant's inquiry. Only
    registered ones are valid, and they were checked when they registered: a malformed one is a
    bad request, and is answered as such (bounded, escaped: the caller's text, not ours)."""
    problem = (participant and participant_name_problem(participant)) or (
        incarnation_problem(incarnation)
    )
    if not problem:
        return None
    return problem.encode("ascii", "backslashreplace").decode("ascii")


def transaction_id_problem(transaction_id: str) -> str | None:
    """What is wrong with a transaction id a caller sent, or None."""
    if not TRANSACTION_ID_PATTERN.fullmatch(transaction_id):
        return (
            f"transaction_id {transaction_id[:40]!r} is malformed: 1..128 characters of "
            "[A-Za-z0-9._:-]"
        )
    return None


def branch_ids_problem(transaction_id: str, branch: int) -> str | None:
    """What is wrong with a (transaction id, branch) pair a caller sent, or None."""
    problem = transaction_id_problem(transaction_id)
    if problem:
        return problem
    if branch >= BRANCHES_PER_TRANSACTION_MAX:
        return (
            f"branch {branch} is out of range: branches are numbered 0.."
            f"{BRANCHES_PER_TRANSACTION_MAX - 1}"
        )
    return None


def reason_kept(text: str) -> str:
    """What a participant said (a reason, an error), cut to REASON_CHARS_MAX, as the coordinator
    and the participant SDK keep it: with each of up to 32 branches of a transaction in one
    answer, and with each of up to BRANCHES_DECIDED_KEPT decided branches, 1,000 of which a
    ListBranches answers (8 KB reasons took 600 branches' answer past MESSAGE_BYTES_MAX)."""
    if len(text) <= REASON_CHARS_MAX:
        return text
    cut = len(text) - REASON_CHARS_MAX
    return f"{text[:REASON_CHARS_MAX]}... ({cut} more characters)"
