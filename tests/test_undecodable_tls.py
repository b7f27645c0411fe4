"""Undecodable requests on servers with authorization: the check comes after it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from dtm import security
from dtm.tools import certs
from tests.harness import BAD_UTF8_ID, expect_status
from tests.tls_cluster import secure_cluster

Code = grpc.StatusCode


async def call_raw(address: str, tls: security.TlsConfig, method: str) -> object:
    async with security.channel(address, tls) as channel:
        return await channel.unary_unary(method)(BAD_UTF8_ID, timeout=10)


def test_an_undecodable_request_is_refused_after_authorization(tmp_path: Path) -> None:
    ca = certs.generate(tmp_path / "certs")

    async def scenario() -> None:
        async with secure_cluster(tmp_path / "data", ca) as cluster:
            prepare = "/dtm.v1.Participant/Prepare"
            notification = cluster.address("notification")
            # A caller who may not call the method learns only that, whatever it sent.
            await expect_status(
                call_raw(notification, cluster.tls("client"), prepare),
                Code.PERMISSION_DENIED,
                "may not call",
            )
            await expect_status(
                call_raw(notification, cluster.tls("coordinator"), prepare),
                Code.INVALID_ARGUMENT,
                "the request is not a valid dtm.v1.PrepareRequest",
            )
            await expect_status(
                call_raw(
                    cluster.coordinator_address, cluster.tls("client"), "/dtm.v1.Coordinator/Submit"
                ),
                Code.INVALID_ARGUMENT,
                "the request is not a valid dtm.v1.SubmitRequest",
            )

    asyncio.run(scenario())
