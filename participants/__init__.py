"""The participant SDK (participants.server) and the shop services (participants.services)."""

# dtm's package sets gRPC's log verbosity before anything imports grpc: a service started
# as `python -m participants.services.X` runs this first.
import dtm  # noqa: F401
