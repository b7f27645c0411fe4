"""dtm: a distributed transaction manager over gRPC.

gRPC's C core writes lines of its own to stderr, between the servers' key=value lines: an
INFO line for every connection whose TLS handshake fails, from anyone who connects ("I...
ssl_transport_security.cc] Handshake failed ..."). It reads GRPC_VERBOSITY once, when grpc is
imported, so it is set here, before any module of ours imports grpc: ERROR unless the user set
it. Not NONE: an error of gRPC's that reaches no call of ours would then go unseen. What a
failed bind or handshake means is in our own lines (`cannot listen on ...`; a client's
failure with its hint); GRPC_VERBOSITY=INFO shows a server's side of a failed handshake.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
