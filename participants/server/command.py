"""run(service, argv): the entry point of a participant process.

Part of `participants.server`: see its docstring."""

from __future__ import annotations

import sys
from typing import Any

from dtm import grpc_edge, limits, logs
from participants.server.process import ParticipantServer
from participants.server.settings import (
    parse_args,
)
from participants.service import Service, service_problem


def run(service: Service[Any], argv: list[str] | None = None) -> None:
    """Entry point for a participant process. Exits with status 1 when it cannot start, or
    when the coordinator refuses its registration for good."""
    problem = limits.participant_name_problem(service.name) or service_problem(service)
    if problem:
        sys.exit(f"dtm service {service.name}: error: {problem}")
    participant_config = parse_args(service.name, argv, getattr(service, "settings_type", None))
    if participant_config.own_settings is not None:
        service.configure(participant_config.own_settings)  # before recovery replays the log
    logs.configure(service.name, participant_config.log_level)
    grpc_edge.use_fast_event_loop()
    grpc_edge.run_server(lambda: ParticipantServer(service, participant_config))
