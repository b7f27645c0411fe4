"""The coordinator and two participants (inventory, notification) in process with mutual TLS,
each with its own certificate from a test CA made by `dtm.tools.certs`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from dtm import security
from dtm.coordinator.engine import CoordinatorConfig
from dtm.coordinator.server import CoordinatorServer, ServerConfig
from participants.server import ParticipantConfig, ParticipantServer
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService

TIMEOUT_S = 5.0


@dataclass
class SecureCluster:
    certs: Path
    coordinator: CoordinatorServer
    participants: dict[str, ParticipantServer]

    @property
    def coordinator_address(self) -> str:
        return f"127.0.0.1:{self.coordinator.port}"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.participants[name].port}"

    def tls(self, identity: str) -> security.TlsConfig:
        return security.TlsConfig.for_identity(self.certs, identity)


@asynccontextmanager
async def secure_cluster(
    data_dir: Path,
    certs_dir: Path,
    coordinator_policy: security.Policy | None = None,
    test_control: bool = False,
    in_doubt_after_ms: int = 2_000,
    metrics: bool = False,
) -> AsyncIterator[SecureCluster]:
    """`metrics`: every server serves /metrics too, on a free port (its `metrics_port`)."""
    metrics_listen = "127.0.0.1:0" if metrics else ""
    policy = coordinator_policy or security.Policy()
    coordinator = CoordinatorServer(
        ServerConfig(
            data_dir=data_dir,
            listen="127.0.0.1:0",
            engine=CoordinatorConfig(prepare_timeout_ms=2_000, transaction_timeout_ms=5_000),
            tls=security.TlsConfig.for_identity(certs_dir, "coordinator", policy=policy),
            metrics_listen=metrics_listen,
        )
    )
    await coordinator.start()
    participants: dict[str, ParticipantServer] = {}
    try:
        for service in (InventoryService({"sku-apple": 10}), NotificationService()):
            server = ParticipantServer(
                service,
                ParticipantConfig(
                    data_dir=data_dir,
                    coordinator=f"127.0.0.1:{coordinator.port}",
                    tls=security.TlsConfig.for_identity(certs_dir, service.name),
                    test_control=test_control,
                    in_doubt_after_ms=in_doubt_after_ms,
                    metrics_listen=metrics_listen,
                ),
            )
            participants[service.name] = server
            await server.start()
            # Registration itself goes over mutual TLS, as a participant identity.
            await asyncio.wait_for(server.registered.wait(), TIMEOUT_S)
        yield SecureCluster(certs_dir, coordinator, participants)
    finally:
        for server in participants.values():
            await server.stop(0.1)
        await coordinator.stop(0.1)
