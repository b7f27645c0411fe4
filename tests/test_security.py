"""Mutual TLS and authorization by identity: every refusal is proven against real servers.

The coordinator and two participants (inventory, notification) run in-process with mutual TLS,
each with its own certificate from a test CA made by `dtm.tools.certs`; clients call them with
certificates of various identities, from that CA, from another CA, or with none.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtm import cli, security
from dtm.cluster import SERVICES, Cluster, Ports
from dtm.coordinator.server import CoordinatorServer, ServerConfig
from dtm.orderflow import OrderClient, order_request
from dtm.tools import certs
from dtmpb.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    shop_pb2,
    shop_pb2_grpc,
)
from participants.server import ParticipantConfig, ParticipantServer
from participants.server import settings as participant_settings
from participants.services.notification import NotificationService
from tests.harness import eventually, expect_status, pack
from tests.tls_cluster import TIMEOUT_S, SecureCluster, secure_cluster

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certs.generate(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def rogue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, unknown to the servers, issuing certificates with the very same names."""
    return certs.generate(tmp_path_factory.mktemp("rogue"), ["client", "coordinator"])


def order(order_id: str) -> list[coordinator_pb2.BranchRequest]:
    """Two branches, so the transaction runs both phases (Prepare, then Commit)."""
    return [
        coordinator_pb2.BranchRequest(
            participant="inventory",
            operation=pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            ),
        ),
        coordinator_pb2.BranchRequest(
            participant="notification",
            operation=pack(
                shop_pb2.SendNotification(order_id=order_id, recipient="a@example.test", body="hi")
            ),
        ),
    ]


async def sent_count(cluster: SecureCluster) -> int:
    async with security.channel(cluster.address("notification"), cluster.tls("operator")) as ch:
        response = await shop_pb2_grpc.NotificationStub(ch).ListSent(
            shop_pb2.ListSentRequest(), timeout=TIMEOUT_S
        )
    return len(response.sent)


def test_a_transaction_commits_over_mutual_tls(tmp_path: Path, ca_dir: Path) -> None:
    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            address = cluster.coordinator_address
            async with security.channel(address, cluster.tls("client"), "coordinator") as ch:
                response = await coordinator_pb2_grpc.CoordinatorStub(ch).Submit(
                    coordinator_pb2.SubmitRequest(branches=order("o-1")), timeout=TIMEOUT_S
                )
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome, response.reason

            async def sent() -> bool:  # phase 2 runs after the answer (rule 15)
                return 1 == await sent_count(cluster)

            await eventually(sent)

    asyncio.run(scenario())


def test_a_client_without_a_trusted_certificate_is_refused(
    tmp_path: Path, ca_dir: Path, rogue_dir: Path
) -> None:
    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            ca = cluster.tls("client").ca_pem
            rogue = security.TlsConfig.for_identity(rogue_dir, "client")
            refused = {
                # TLS that trusts the server but shows no certificate of its own.
                "no certificate": grpc.ssl_channel_credentials(root_certificates=ca),
                # A certificate named "client", but signed by a CA the servers do not trust.
                "untrusted CA": grpc.ssl_channel_credentials(
                    root_certificates=ca,
                    private_key=rogue.key_pem,
                    certificate_chain=rogue.cert_pem,
                ),
            }
            request = coordinator_pb2.SubmitRequest(branches=order("o-refused"))
            for what, credentials in refused.items():
                # The handshake fails, so no handler ever sees the call.
                async with grpc.aio.secure_channel(cluster.coordinator_address, credentials) as ch:
                    stub = coordinator_pb2_grpc.CoordinatorStub(ch)
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await stub.Submit(request, timeout=TIMEOUT_S)
                    assert Code.UNAVAILABLE == raised.value.code(), (what, raised.value)
                # Straight to a participant is no different.
                async with grpc.aio.secure_channel(cluster.address("inventory"), credentials) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await participant_pb2_grpc.ParticipantStub(ch).Commit(
                            participant_pb2.CommitRequest(transaction_id="t-1", branch=0),
                            timeout=TIMEOUT_S,
                        )
                    assert Code.UNAVAILABLE == raised.value.code(), (what, raised.value)
            # Plaintext against a TLS port fails as well.
            async with grpc.aio.insecure_channel(cluster.coordinator_address) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await coordinator_pb2_grpc.CoordinatorStub(ch).Submit(
                        request, timeout=TIMEOUT_S
                    )
            # Nothing was applied anywhere, and the coordinator never heard of a transaction.
            assert 0 == await sent_count(cluster)
            assert not list(cluster.coordinator.engine.views())

    asyncio.run(scenario())


def scrape_metrics(port: int, ca: Path, client: security.TlsConfig | None) -> str:
    """GET /metrics over HTTPS, trusting `ca`, showing `client`'s certificate (or none)."""
    context = ssl.create_default_context(cafile=ca)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    url = f"https://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=TIMEOUT_S) as answer:
        return str(answer.read().decode())


def scrape_plain_http(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
        return str(answer.read().decode())


def test_metrics_under_mutual_tls_are_served_over_https_to_clients_of_the_ca_only(
    tmp_path: Path, ca_dir: Path, rogue_dir: Path
) -> None:
    """/metrics was plain HTTP, readable by anyone who could reach the port, while the
    server's gRPC port required mutual TLS. Now it is HTTPS with the server's certificate, and
    asks for a client certificate of the same CA."""

    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir, metrics=True) as cluster:
            ca = ca_dir / "ca.pem"
            servers = {"coordinator": cluster.coordinator, **cluster.participants}
            for name, server in servers.items():
                port = server.metrics_port
                text = await asyncio.to_thread(scrape_metrics, port, ca, cluster.tls("operator"))
                assert "dtm_wal_fsyncs_total" in text, name
                # Plain HTTP is answered 400, saying what the endpoint wants.
                with pytest.raises(urllib.error.HTTPError) as plain:
                    await asyncio.to_thread(scrape_plain_http, port)
                assert 400 == plain.value.code, name
                assert "speaks HTTPS only" in plain.value.read().decode(), name
                rogue = security.TlsConfig.for_identity(rogue_dir, "client")
                refused = {
                    "no certificate": functools.partial(scrape_metrics, port, ca, None),
                    "another CA's certificate": functools.partial(scrape_metrics, port, ca, rogue),
                }
                for what, attempt in refused.items():
                    # The handshake fails, or the server closes the connection once it has
                    # seen the certificate (TLS 1.3): either way, no metrics.
                    with pytest.raises(OSError):
                        await asyncio.to_thread(attempt)
                        pytest.fail(f"{name}: /metrics answered a scrape with {what}")

    asyncio.run(scenario())


def test_a_client_silent_in_its_tls_handshake_holds_no_other_scrape(
    tmp_path: Path, ca_dir: Path
) -> None:
    """prometheus_client's own TLS runs every handshake in the endpoint's one accepting
    thread: a connection that sent nothing held every scrape after it (and the server's stop)
    for good. Each connection shakes hands on its own thread now."""

    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir, metrics=True) as cluster:
            port = cluster.coordinator.metrics_port
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
                text = await asyncio.to_thread(
                    scrape_metrics, port, ca_dir / "ca.pem", cluster.tls("operator")
                )
            assert "dtm_transactions_total" in text

    asyncio.run(scenario())


def test_only_the_coordinator_may_drive_a_participant(tmp_path: Path, ca_dir: Path) -> None:
    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            prepare = participant_pb2.PrepareRequest(
                transaction_id="t-direct",
                branch=0,
                operation=order("o-direct")[1].operation,
            )
            commit = participant_pb2.CommitRequest(transaction_id="t-direct", branch=0)
            # A client, an operator and another participant: valid certificates, wrong role.
            for identity in ("client", "operator", "inventory"):
                tls = cluster.tls(identity)
                async with security.channel(cluster.address("notification"), tls) as ch:
                    stub = participant_pb2_grpc.ParticipantStub(ch)
                    for method, call in (
                        ("Prepare", stub.Prepare(prepare, timeout=TIMEOUT_S)),
                        ("Commit", stub.Commit(commit, timeout=TIMEOUT_S)),
                        (
                            "Rollback",
                            stub.Rollback(
                                participant_pb2.RollbackRequest(
                                    transaction_id="t-direct", branch=0
                                ),
                                timeout=TIMEOUT_S,
                            ),
                        ),
                        (
                            "Recover",
                            stub.Recover(participant_pb2.RecoverRequest(), timeout=TIMEOUT_S),
                        ),
                    ):
                        await expect_status(
                            call,
                            Code.PERMISSION_DENIED,
                            f"identity {identity!r}",
                            f"/dtm.v1.Participant/{method}",
                            "coordinator",
                        )
            # The refused Prepare never reached the branch engine.
            assert not cluster.participants["notification"].engine.listed(set(), 1)
            # The coordinator's own certificate is what the participant obeys.
            coordinator = cluster.tls("coordinator")
            async with security.channel(cluster.address("notification"), coordinator) as ch:
                answer = await participant_pb2_grpc.ParticipantStub(ch).Recover(
                    participant_pb2.RecoverRequest(), timeout=TIMEOUT_S
                )
            assert [] == list(answer.branches)

    asyncio.run(scenario())


def test_only_participants_may_register_and_only_as_themselves(
    tmp_path: Path, ca_dir: Path
) -> None:
    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            before = dict(cluster.coordinator.engine.registry.participants)

            def hijack(name: str) -> coordinator_pb2.RegisterParticipantRequest:
                return coordinator_pb2.RegisterParticipantRequest(
                    name=name, address="127.0.0.1:1", capabilities=coordinator_pb2.Capabilities()
                )

            for identity in ("client", "operator"):
                tls = cluster.tls(identity)
                async with security.channel(cluster.coordinator_address, tls) as ch:
                    stub = coordinator_pb2_grpc.CoordinatorStub(ch)
                    await expect_status(
                        stub.RegisterParticipant(hijack("inventory"), timeout=TIMEOUT_S),
                        Code.PERMISSION_DENIED,
                        f"identity {identity!r}",
                        "RegisterParticipant",
                        "participant",
                        # What to change for a new participant (examples/loyalty) to register.
                        "payment; the refusing server's --authz-participants)",
                    )
                    inquiry = stub.QueryOutcome(
                        coordinator_pb2.QueryOutcomeRequest(transaction_id="t-1"),
                        timeout=TIMEOUT_S,
                    )
                    if identity == "operator":  # operators may ask, to check before forcing
                        answer = await inquiry
                        assert coordinator_pb2.OUTCOME_ABORTED == answer.outcome
                        continue
                    await expect_status(inquiry, Code.PERMISSION_DENIED, "QueryOutcome")
            # A participant may register, but not under another participant's name.
            async with security.channel(cluster.coordinator_address, cluster.tls("payment")) as ch:
                await expect_status(
                    coordinator_pb2_grpc.CoordinatorStub(ch).RegisterParticipant(
                        hijack("inventory"), timeout=TIMEOUT_S
                    ),
                    Code.PERMISSION_DENIED,
                    "'payment' may not register participant 'inventory'",
                )
            # Nor under another name its certificate carries: every test certificate has
            # DNS:localhost (found by a bug hunt: "localhost" was registered).
            async with security.channel(
                cluster.coordinator_address, cluster.tls("inventory")
            ) as ch:
                stub = coordinator_pb2_grpc.CoordinatorStub(ch)
                for name in ("localhost",):
                    await expect_status(
                        stub.RegisterParticipant(hijack(name), timeout=TIMEOUT_S),
                        Code.PERMISSION_DENIED,
                        f"'inventory' may not register participant {name!r}",
                    )
            assert before == cluster.coordinator.engine.registry.participants

    asyncio.run(scenario())


def test_only_a_participant_may_report_a_heuristic_and_only_its_own(
    tmp_path: Path, ca_dir: Path
) -> None:
    """ReportHeuristic records what the coordinator lists as heuristic damage: a client or an
    operator may not report, nor a participant for another (the certificate names it)."""

    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            report = coordinator_pb2.ReportHeuristicRequest(
                transaction_id="t-none",
                branch=0,
                participant="inventory",
                forced=coordinator_pb2.OUTCOME_COMMITTED,
                decision=coordinator_pb2.OUTCOME_ABORTED,
            )
            for identity in ("client", "operator"):
                async with security.channel(
                    cluster.coordinator_address, cluster.tls(identity)
                ) as ch:
                    await expect_status(
                        coordinator_pb2_grpc.CoordinatorStub(ch).ReportHeuristic(
                            report, timeout=TIMEOUT_S
                        ),
                        Code.PERMISSION_DENIED,
                        f"identity {identity!r}",
                        "ReportHeuristic",
                    )
            async with security.channel(cluster.coordinator_address, cluster.tls("payment")) as ch:
                await expect_status(
                    coordinator_pb2_grpc.CoordinatorStub(ch).ReportHeuristic(
                        report, timeout=TIMEOUT_S
                    ),
                    Code.PERMISSION_DENIED,
                    "'payment' may not report the heuristic outcomes of participant 'inventory'",
                )
            assert 0 == len(cluster.coordinator.engine.heuristics)
            async with security.channel(
                cluster.coordinator_address, cluster.tls("inventory")
            ) as ch:
                kept = await coordinator_pb2_grpc.CoordinatorStub(ch).ReportHeuristic(
                    report, timeout=TIMEOUT_S
                )
            assert ("t-none", "inventory") == (
                kept.heuristic.transaction_id,
                kept.heuristic.participant,
            )

    asyncio.run(scenario())


def test_admin_is_for_operators_and_submit_for_clients(tmp_path: Path, ca_dir: Path) -> None:
    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            address = cluster.address("inventory")
            async with security.channel(address, cluster.tls("operator")) as ch:
                await participant_pb2_grpc.ParticipantAdminStub(ch).ListLocks(
                    participant_pb2.ListLocksRequest(), timeout=TIMEOUT_S
                )
            for identity in ("client", "coordinator"):
                async with security.channel(address, cluster.tls(identity)) as ch:
                    await expect_status(
                        participant_pb2_grpc.ParticipantAdminStub(ch).ListLocks(
                            participant_pb2.ListLocksRequest(), timeout=TIMEOUT_S
                        ),
                        Code.PERMISSION_DENIED,
                        f"identity {identity!r}",
                        "ListLocks",
                        "operator",
                    )
            # A participant's certificate does not make it a client of the coordinator.
            tls = cluster.tls("inventory")
            async with security.channel(cluster.coordinator_address, tls) as ch:
                await expect_status(
                    coordinator_pb2_grpc.CoordinatorStub(ch).Submit(
                        coordinator_pb2.SubmitRequest(branches=order("o-by-participant")),
                        timeout=TIMEOUT_S,
                    ),
                    Code.PERMISSION_DENIED,
                    "'inventory'",
                    "Submit",
                )
                batch = coordinator_pb2.SubmitBatchRequest(
                    transactions=[coordinator_pb2.SubmitRequest(branches=order("o-by-batch"))]
                )
                await expect_status(
                    coordinator_pb2_grpc.CoordinatorStub(ch).SubmitBatch(batch, timeout=TIMEOUT_S),
                    Code.PERMISSION_DENIED,
                    "'inventory'",
                    "SubmitBatch",
                )
            # Forgetting a heuristic outcome is the operators' alone; listing them is a read.
            forget = coordinator_pb2.ForgetHeuristicRequest(transaction_id="t-none", branch=0)
            unregister = coordinator_pb2.UnregisterParticipantRequest(name="ghost")
            async with security.channel(cluster.coordinator_address, cluster.tls("client")) as ch:
                stub = coordinator_pb2_grpc.CoordinatorStub(ch)
                # A client may submit a batch: allowed, and answered per transaction.
                allowed = await stub.SubmitBatch(
                    coordinator_pb2.SubmitBatchRequest(
                        transactions=[coordinator_pb2.SubmitRequest(branches=order("o-batch"))]
                    ),
                    timeout=TIMEOUT_S,
                )
                assert coordinator_pb2.OUTCOME_COMMITTED == allowed.results[0].response.outcome
                await expect_status(
                    stub.ForgetHeuristic(forget, timeout=TIMEOUT_S),
                    Code.PERMISSION_DENIED,
                    "'client'",
                    "ForgetHeuristic",
                    "operator",
                )
                listed = await stub.ListHeuristics(
                    coordinator_pb2.ListHeuristicsRequest(), timeout=TIMEOUT_S
                )
                assert 0 == listed.total
                # So is unregistering a participant.
                await expect_status(
                    stub.UnregisterParticipant(unregister, timeout=TIMEOUT_S),
                    Code.PERMISSION_DENIED,
                    "'client'",
                    "UnregisterParticipant",
                    "operator",
                )
            async with security.channel(cluster.coordinator_address, cluster.tls("operator")) as ch:
                operator = coordinator_pb2_grpc.CoordinatorStub(ch)
                await expect_status(  # allowed, and nothing to forget
                    operator.ForgetHeuristic(forget, timeout=TIMEOUT_S),
                    Code.NOT_FOUND,
                    "t-none/0",
                )
                await expect_status(  # allowed, and no such participant
                    operator.UnregisterParticipant(unregister, timeout=TIMEOUT_S),
                    Code.NOT_FOUND,
                    "'ghost' is not registered",
                )
            # Health checks stay open to any verified peer (readiness probes).
            async with security.channel(address, cluster.tls("inventory")) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
                )
            assert health_pb2.HealthCheckResponse.SERVING == health.status
            # Only the client's batch was applied; every refused call applied nothing.

            async def only_the_batch_sent() -> bool:
                return 1 == await sent_count(cluster)

            await eventually(only_the_batch_sent)

    asyncio.run(scenario())


def test_certificates_and_configuration(ca_dir: Path, tmp_path: Path) -> None:
    for identity in (*certs.IDENTITIES, "ca"):
        mode = stat.S_IMODE(certs.key_path(ca_dir, identity).stat().st_mode)
        assert 0o600 == mode, identity
    with pytest.raises(ValueError, match="identity"):
        certs.generate(tmp_path / "bad", ["../escape"])

    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    assert security.from_options(parser.parse_args([]), environ={}) is None
    with pytest.raises(ValueError, match="--tls-key"):
        security.from_options(
            parser.parse_args(["--tls-ca", str(ca_dir / "ca.pem")]),
            environ={"DTM_TLS_CERT": str(ca_dir / "client.pem")},
        )
    environ = {
        "DTM_TLS_CA": str(ca_dir / "ca.pem"),
        "DTM_TLS_CERT": str(ca_dir / "client.pem"),
        "DTM_TLS_KEY": str(ca_dir / "client-key.pem"),
        "DTM_AUTHZ_CLIENTS": "shop-frontend, operator",
    }
    cfg = security.from_options(parser.parse_args(["--authz-operators", "ops"]), environ)
    assert cfg is not None
    assert ca_dir / "client.pem" == cfg.cert
    assert frozenset({"shop-frontend", "operator"}) == cfg.policy.clients
    assert frozenset({"ops"}) == cfg.policy.operators
    assert security.PARTICIPANT_IDENTITIES == cfg.policy.participants
    # A child process given these flags ends up with the same configuration.
    again = security.from_options(parser.parse_args(security.arguments(cfg)), environ={})
    assert cfg == again
    # "Client certificates optional" would give no peer an identity: refused, not half-on.
    # Every spelling of "off" a boolean setting takes ("off" passed unnoticed; found by a bug
    # hunt: the operator believed client certificates optional).
    for off in ("0", "false", "No", "off"):
        with pytest.raises(ValueError, match=f"DTM_TLS_REQUIRE_CLIENT_CERT={off} is not supp"):
            security.from_options(
                parser.parse_args([]), {**environ, "DTM_TLS_REQUIRE_CLIENT_CERT": off}
            )


def test_tls_files_from_the_environment_may_start_with_a_tilde(
    ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DTM_TLS_CA='~/ca.pem' (quoted: no shell expands it) was "not a readable file", while
    the same path in the configuration file is in the home directory."""
    monkeypatch.setenv("HOME", str(ca_dir))
    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    environ = {
        "DTM_TLS_CA": "~/ca.pem",
        "DTM_TLS_CERT": "~/orders.pem",
        "DTM_TLS_KEY": "~/orders-key.pem",
    }
    cfg = security.from_options(parser.parse_args([]), environ)
    assert cfg is not None and ca_dir / "ca.pem" == cfg.ca_cert


def test_tls_files_from_the_configuration_file(ca_dir: Path) -> None:
    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    configured = {
        "ca": ca_dir / "ca.pem",
        "cert": ca_dir / "inventory.pem",
        "key": ca_dir / "inventory-key.pem",
    }
    cfg = security.from_options(parser.parse_args([]), environ={}, configured=configured)
    assert cfg is not None
    assert (ca_dir / "ca.pem", ca_dir / "inventory.pem") == (cfg.ca_cert, cfg.cert)
    # DTM_TLS_* and the flags are more specific than the file: they win.
    environ = {"DTM_TLS_CERT": str(ca_dir / "orders.pem")}
    flags = parser.parse_args(["--tls-key", str(ca_dir / "orders-key.pem")])
    cfg = security.from_options(flags, environ=environ, configured=configured)
    assert cfg is not None
    assert (ca_dir / "orders.pem", ca_dir / "orders-key.pem") == (cfg.cert, cfg.key)
    with pytest.raises(ValueError, match=r"missing --tls-cert, --tls-key .*tls_cert"):
        security.from_options(parser.parse_args([]), environ={}, configured={"ca": ca_dir})
    unset = {"ca": None, "cert": None, "key": None}  # "" in the file
    assert security.from_options(parser.parse_args([]), environ={}, configured=unset) is None


def test_a_cluster_speaks_mutual_tls_from_its_configuration_file_alone(
    tmp_path: Path, ca_dir: Path
) -> None:
    """Five real processes given nothing but DTM_CONFIG: no --tls-* flag, no DTM_TLS_*. Each
    finds its own certificate in its own section; a client with a trusted certificate places
    an order, one without is refused."""
    lines = [
        f'[coordinator]\ntls_ca = "{ca_dir / "ca.pem"}"',
        f'tls_cert = "{ca_dir / "coordinator.pem"}"\ntls_key = "{ca_dir / "coordinator-key.pem"}"',
        f'[participant]\ntls_ca = "{ca_dir / "ca.pem"}"',
    ]
    for name in SERVICES:
        lines.append(
            f'[{name}]\ntls_cert = "{ca_dir / f"{name}.pem"}"\n'
            f'tls_key = "{ca_dir / f"{name}-key.pem"}"'
        )
    path = tmp_path / "dtm.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    environ = {name: "" for name in ("DTM_TLS_CA", "DTM_TLS_CERT", "DTM_TLS_KEY")}
    cluster = Cluster(
        tmp_path / "data", Ports.free(), extra_env={"DTM_CONFIG": str(path), **environ}
    )
    # The cluster's own readiness probes need a certificate too (as `--tls-dir` would give).
    cluster.client_tls = security.TlsConfig.for_identity(ca_dir, "operator")
    client_tls = security.TlsConfig.for_identity(ca_dir, "client")

    async def scenario() -> None:
        request = order_request("o-1", "cust", "acct-alice", [("sku-apple", 1)], 100, "c@x.test")
        address = cluster.coordinator_address
        async with security.channel(address, client_tls, security.COORDINATOR_IDENTITY) as chan:
            result = await OrderClient(chan).submit(request)
        assert "COMMITTED" == result.outcome, result.reason
        async with OrderClient(address) as plaintext:
            refused = await plaintext.submit(request, timeout_s=TIMEOUT_S)
        assert Code.UNAVAILABLE == refused.code

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_the_dtm_command_takes_its_certificate_from_cli_in_the_configuration_file(
    tmp_path: Path, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's certificate in [cli] of the file: no DTM_TLS_* in the shell, where every
    server started from it would read them too."""
    from tests.cli_runner import dtm

    for name in ("DTM_TLS_CA", "DTM_TLS_CERT", "DTM_TLS_KEY", "DTM_CONFIG"):
        monkeypatch.delenv(name, raising=False)

    async def scenario() -> None:
        async with secure_cluster(tmp_path, ca_dir) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            status, _, err = await dtm(*at, "--timeout", "2", "heuristics")
            assert status != 0 and "cannot reach the coordinator" in err  # plaintext: no
            settings = tmp_path / "dtm.toml"
            settings.write_text(
                "[cli]\n"
                f'tls_ca = "{ca_dir / "ca.pem"}"\n'
                f'tls_cert = "{ca_dir / "operator.pem"}"\n'
                f'tls_key = "{ca_dir / "operator-key.pem"}"\n',
                encoding="utf-8",
            )
            status, out, err = await dtm(*at, "--config", str(settings), "heuristics")
            assert (0, True) == (status, out.startswith("no heuristic outcomes")), err
            # A flag still wins over the file: a client certificate may not forget.
            flags = ["--tls-cert", str(ca_dir / "client.pem")]
            flags += ["--tls-key", str(ca_dir / "client-key.pem")]
            forget = ["heuristics", "forget", "t-1", "0"]
            status, _, err = await dtm(*at, "--config", str(settings), *flags, *forget)
            assert status != 0
            assert "identity 'client' may not call /dtm.v1.Coordinator/ForgetHeuristic" in err

    asyncio.run(scenario())


def test_dtm_force_checks_the_decision_with_an_operator_certificate(
    tmp_path: Path, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --authz-clients narrowed to "client", the operator may still read the
    coordinator (GetTransaction, QueryOutcome), so `dtm force` sees the commit decision and
    refuses a rollback. Where the coordinator does refuse the operator's read, the force is
    refused too: the check fails closed (found by a bug hunt: PERMISSION_DENIED was swallowed
    and the force contradicted the decision)."""
    from tests.cli_runner import dtm

    for name in ("DTM_TLS_CA", "DTM_TLS_CERT", "DTM_TLS_KEY", "DTM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--tls-ca", str(ca_dir / "ca.pem"), "--tls-cert", str(ca_dir / "operator.pem")]
    flags += ["--tls-key", str(ca_dir / "operator-key.pem")]

    async def scenario(policy: security.Policy, refusal: str, refused: int) -> None:
        async with secure_cluster(
            tmp_path / refusal[:8], ca_dir, policy, test_control=True, in_doubt_after_ms=600_000
        ) as cluster:
            async with security.channel(
                cluster.address("notification"), cluster.tls("operator")
            ) as ch:
                await participant_pb2_grpc.ParticipantAdminStub(ch).SetFault(
                    participant_pb2.SetFaultRequest(
                        mode=participant_pb2.FAULT_MODE_REJECT_DECISIONS
                    )
                )
            address = cluster.coordinator_address
            async with security.channel(address, cluster.tls("client"), "coordinator") as ch:
                response = await coordinator_pb2_grpc.CoordinatorStub(ch).Submit(
                    coordinator_pb2.SubmitRequest(transaction_id="t-1", branches=order("o-1")),
                    timeout=TIMEOUT_S,
                )
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            at = ["--coordinator", address, *flags]
            target = ["--address", cluster.address("notification")]
            status, _, err = await dtm(
                *at, "force", "t-1", "1", *target, "--rollback", "--i-understand"
            )
            assert refused == status, err
            assert refusal in err
            async with security.channel(
                cluster.address("notification"), cluster.tls("operator")
            ) as ch:
                branches = await participant_pb2_grpc.ParticipantAdminStub(ch).ListBranches(
                    participant_pb2.ListBranchesRequest(), timeout=TIMEOUT_S
                )
            states = [b.state for b in branches.branches if b.transaction_id == "t-1"]
            assert [participant_pb2.BRANCH_STATE_PREPARED] == states

    narrowed = security.Policy(clients=frozenset({"client"}))
    # Refused as unsafe: the coordinator's decision says no.
    asyncio.run(scenario(narrowed, "decided commit for t-1", cli.EXIT_UNSAFE))
    # The coordinator's operators are someone else: it refuses the operator's read.
    elsewhere = security.Policy(clients=frozenset({"client"}), operators=frozenset({"root"}))
    asyncio.run(scenario(elsewhere, "refusing to force t-1 without knowing", cli.EXIT_ERROR))


def test_a_participant_checks_a_direct_force_with_its_own_certificate(
    tmp_path: Path, ca_dir: Path
) -> None:
    """An operator's ForceOutcome straight to the participant (no `dtm force` checks): the
    participant asks its coordinator itself, over its own mutual TLS as a participant (an
    inquiry the policy allows), hears the commit, and refuses the rollback as unsafe;
    coordinator_lost included, since a coordinator with the commit on record did not lose its
    log (before, the override did not ask, and the rollback went against the commit)."""

    async def scenario() -> None:
        async with (
            secure_cluster(
                tmp_path, ca_dir, test_control=True, in_doubt_after_ms=600_000
            ) as cluster,
            security.channel(cluster.address("notification"), cluster.tls("operator")) as ch,
        ):
            admin = participant_pb2_grpc.ParticipantAdminStub(ch)
            await admin.SetFault(
                participant_pb2.SetFaultRequest(mode=participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            )
            address = cluster.coordinator_address
            async with security.channel(address, cluster.tls("client"), "coordinator") as c:
                response = await coordinator_pb2_grpc.CoordinatorStub(c).Submit(
                    coordinator_pb2.SubmitRequest(transaction_id="t-1", branches=order("o-1")),
                    timeout=TIMEOUT_S,
                )
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            force = participant_pb2.ForceOutcomeRequest(
                transaction_id="t-1",
                branch=1,
                commit=False,
                i_understand_this_is_heuristic=True,
            )
            await expect_status(
                admin.ForceOutcome(force, timeout=TIMEOUT_S),
                grpc.StatusCode.FAILED_PRECONDITION,
                "decided commit for t-1",
            )
            force.coordinator_lost = True
            await expect_status(
                admin.ForceOutcome(force, timeout=TIMEOUT_S),
                grpc.StatusCode.FAILED_PRECONDITION,
                "decided commit for t-1",
                "coordinator_lost does not apply",
            )

    asyncio.run(scenario())


def test_tls_material_that_cannot_work_is_named_at_start(
    tmp_path: Path, ca_dir: Path, rogue_dir: Path
) -> None:
    """A key that is not the certificate's, a junk CA, swapped files, a certificate of
    another CA: each is one line naming the file, before anything listens (found by a bug
    hunt: gRPC's failure to bind read "is the port already in use?")."""
    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")

    def load(ca: Path, cert: Path, key: Path) -> None:
        flags = ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
        security.from_options(parser.parse_args(flags), environ={})

    ca, cert, key = ca_dir / "ca.pem", ca_dir / "inventory.pem", ca_dir / "inventory-key.pem"
    load(ca, cert, key)  # the good set
    cases = [
        ((ca, cert, ca_dir / "orders-key.pem"), "is not the private key of"),
        ((junk, cert, key), "--tls-ca: " + str(junk) + " holds no PEM CA certificate"),
        ((ca, key, cert), "--tls-cert:"),
        ((ca, key, cert), "swapped"),
        # The CA's key for its certificate: nothing was swapped (the hint said so).
        ((ca_dir / "ca-key.pem", cert, key), "it is a private key: give the CA's certificate"),
        ((ca, cert, junk), "--tls-key: " + str(junk) + " holds no PEM private key"),
        ((ca, rogue_dir / "client.pem", rogue_dir / "client-key.pem"), "is not signed by the CA"),
    ]
    for files, message in cases:
        with pytest.raises(security.TlsMaterialError, match=re.escape(message)):
            load(*files)

    # A real coordinator process: one line naming both files, no "port already in use", and
    # exit status 2, as every configuration a server refuses (a missing file included); it
    # was 1, the status of a start that failed on its environment (a port taken).
    wrong_key = ca_dir / "orders-key.pem"
    flags = ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(wrong_key)]
    flags += ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(
        [sys.executable, "-m", "dtm.coordinator.server", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert 2 == done.returncode, done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 == len(lines), done.stderr
    assert f"--tls-key: {wrong_key} is not the private key of" in lines[0], lines[0]
    assert f"--tls-cert, {cert}" in lines[0] and "in use" not in lines[0], lines[0]


def test_a_tls_file_that_cannot_work_is_named_by_the_setting_that_gave_it(
    tmp_path: Path,
    ca_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Files from the configuration file or DTM_TLS_* were named as flags never given
    ("--tls-ca: certs/nope.pem is not a readable file" for tls_ca in [coordinator]; found by a
    bug hunt). Each error names the key and the file, or the variable, that gave the file."""
    from dtm.coordinator.server import parse_args

    for name in list(os.environ):
        if name.startswith("DTM_"):
            monkeypatch.delenv(name)
    settings = tmp_path / "dtm.toml"
    settings.write_text(
        f'[coordinator]\ntls_ca = "{ca_dir / "ca.pem"}"\n'
        f'tls_cert = "{ca_dir / "coordinator.pem"}"\ntls_key = "{ca_dir / "orders-key.pem"}"\n',
        encoding="utf-8",
    )
    base = ["--config", str(settings), "--data-dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as done:
        parse_args(base)
    assert 2 == done.value.code  # a configuration refused, as the missing file below
    origin = f"tls_key ([coordinator] of {settings}, or DTM_COORDINATOR_TLS_*): "
    assert f"{origin}{ca_dir / 'orders-key.pem'} is not the private key" in capsys.readouterr().err
    monkeypatch.setenv("DTM_TLS_CA", str(tmp_path / "nope.pem"))
    with pytest.raises(SystemExit) as done:
        parse_args(base)
    assert 2 == done.value.code
    assert f"DTM_TLS_CA: {tmp_path / 'nope.pem'} is not a readable" in capsys.readouterr().err
    monkeypatch.delenv("DTM_TLS_CA")
    key = ["--tls-key", str(ca_dir / "coordinator-key.pem")]
    assert parse_args([*base, *key]).tls is not None  # the flag wins over the file's key
    # A service refuses the same way.
    service = ["--tls-ca", str(ca_dir / "ca.pem"), "--tls-cert", str(ca_dir / "orders.pem")]
    service += ["--tls-key", str(ca_dir / "payment-key.pem"), "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as done:
        participant_settings.parse_args("orders", service)
    assert 2 == done.value.code
    err = capsys.readouterr().err
    assert f"--tls-key: {ca_dir / 'payment-key.pem'} is not the private key" in err, err
    assert f"--tls-cert, {ca_dir / 'orders.pem'}" in err, err


_PLAINTEXT_CALL_TO_A_TLS_SERVER = """
import asyncio, sys
from pathlib import Path
import participants.server  # first, as the services' and the SDK's users' imports
import grpc
from dtm import grpc_edge, security
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc


async def main() -> None:
    server = grpc.aio.server()
    tls = security.TlsConfig.for_identity(Path(sys.argv[1]), "coordinator")
    port = grpc_edge.bind(server, "127.0.0.1:0", security.server_credentials(tls))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            await stub.ListParticipants(coordinator_pb2.ListParticipantsRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            print(error.code().name)
    await server.stop(None)


asyncio.run(main())
"""


def test_grpcs_own_lines_about_failed_handshakes_stay_out_of_the_logs(ca_dir: Path) -> None:
    """Every plaintext connection to a TLS server, from anyone, wrote gRPC's own unstructured
    "I... ssl_transport_security.cc] Handshake failed" line into the server's log. The
    packages set GRPC_VERBOSITY=ERROR before grpc is imported; a user's setting stays in
    charge (INFO shows the line again)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DTM_", "GRPC_"))}

    def stderr_of_a_plaintext_call(**more: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _PLAINTEXT_CALL_TO_A_TLS_SERVER, str(ca_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**environ, **more},
        )
        assert (0, "UNAVAILABLE\n") == (done.returncode, done.stdout), done.stderr
        return done.stderr

    assert "Handshake failed" not in stderr_of_a_plaintext_call()
    assert "Handshake failed" in stderr_of_a_plaintext_call(GRPC_VERBOSITY="INFO")


def test_a_failure_to_bind_with_tls_mentions_the_credentials() -> None:
    """Credentials gRPC rejects only when it binds (material not checked by from_options)."""
    from dtm import grpc_edge

    async def scenario() -> None:
        server = grpc.aio.server()
        bad = grpc.ssl_server_credentials([(b"junk key", b"junk certificate")])
        with pytest.raises(OSError, match="TLS credentials"):
            grpc_edge.bind(server, "127.0.0.1:0", bad)
        await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("coordinator_tls", "hint"),
    [
        (False, "the coordinator does not speak TLS: give it --tls-ca"),
        (True, "the coordinator closed the connection: does it require TLS? Give this service"),
    ],
)
def test_a_service_with_tls_on_one_side_only_says_so_while_it_retries_registering(
    tmp_path: Path,
    ca_dir: Path,
    capsys: pytest.CaptureFixture[str],
    coordinator_tls: bool,
    hint: str,
) -> None:
    """A TLS service and a plaintext coordinator (or the reverse): the service retried its
    registration every second with gRPC's words alone ("WRONG_VERSION_NUMBER", "Socket
    closed"), which read as a coordinator that is not running (found by a bug hunt). Each
    retry's WARNING now says which side lacks TLS and what to give it."""

    async def scenario() -> None:
        coordinator = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path,
                listen="127.0.0.1:0",
                tls=security.TlsConfig.for_identity(ca_dir, "coordinator")
                if coordinator_tls
                else None,
            )
        )
        await coordinator.start()
        service = NotificationService()
        participant = ParticipantServer(
            service,
            ParticipantConfig(
                data_dir=tmp_path,
                coordinator=f"127.0.0.1:{coordinator.port}",
                tls=None
                if coordinator_tls
                else security.TlsConfig.for_identity(ca_dir, service.name),
            ),
        )
        err: list[str] = []

        async def warned() -> bool:
            err.append(capsys.readouterr().err)
            return "registration failed; retrying" in "".join(err)

        try:
            await participant.start()
            await eventually(warned)
        finally:
            await participant.stop(0.1)
            await coordinator.stop(0.1)
        retries = [line for line in "".join(err).splitlines() if "registration failed" in line]
        assert hint in retries[0].partition(" hint=")[2], retries[0]
        assert not participant.registered.is_set()

    asyncio.run(scenario())


def test_authorization_settings_without_tls_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--authz-* or DTM_AUTHZ_* without TLS were silently ignored (found by a bug hunt): the
    server ran plaintext, authorizing nobody, while its operator believed in a policy."""
    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    with pytest.raises(ValueError, match="--authz-clients given without TLS"):
        security.from_options(parser.parse_args(["--authz-clients", "shop"]), environ={})
    environ = {"DTM_AUTHZ_OPERATORS": "root"}
    with pytest.raises(ValueError, match="DTM_AUTHZ_OPERATORS given without TLS"):
        security.from_options(parser.parse_args([]), environ=environ)
    # The dtm command enforces nothing: it may share a server's shell.
    assert security.from_options(parser.parse_args([]), environ, enforcing=False) is None
    # A server's command line: a usage error naming the flag.
    from dtm.coordinator.server import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--data-dir", str(tmp_path), "--authz-participants", "inventory"])
    assert 2 == done.value.code
    assert "--authz-participants given without TLS" in capsys.readouterr().err


def test_an_authorization_list_naming_nobody_is_refused(ca_dir: Path) -> None:
    """--authz-clients "," (or DTM_AUTHZ_COORDINATOR=" ") started a server whose role
    admitted nobody: every Submit, or every call from the coordinator, refused with
    PERMISSION_DENIED (found by a bug hunt). It is refused at start, naming the setting."""
    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    tls = ["--tls-ca", str(ca_dir / "ca.pem"), "--tls-cert", str(ca_dir / "orders.pem")]
    tls += ["--tls-key", str(ca_dir / "orders-key.pem")]
    with pytest.raises(ValueError, match=r"--authz-clients ',' names no identity.*client,operator"):
        security.from_options(parser.parse_args([*tls, "--authz-clients", ","]), environ={})
    environ = {"DTM_AUTHZ_COORDINATOR": " "}
    with pytest.raises(ValueError, match="DTM_AUTHZ_COORDINATOR ' ' names no identity"):
        security.from_options(parser.parse_args(tls), environ=environ)
    cfg = security.from_options(parser.parse_args([*tls, "--authz-clients", "shop, ,"]), {})
    assert cfg is not None and frozenset({"shop"}) == cfg.policy.clients


def test_the_dtm_command_names_the_coordinators_identity_and_explains_tls_failures(
    tmp_path: Path, rogue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator whose certificate is not "coordinator": --coordinator-identity, or
    coordinator_identity in [cli], names it (only an undocumented DTM_AUTHZ_COORDINATOR did).
    A failed handshake is explained as TLS, not as "is it running?" (both found by a bug
    hunt)."""
    from tests.cli_runner import dtm

    for name in list(os.environ):
        if name.startswith("DTM_"):
            monkeypatch.delenv(name)
    certs_dir = certs.generate(tmp_path / "certs", [*certs.IDENTITIES, "coord-b"])

    async def scenario() -> None:
        server = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path / "data",
                listen="127.0.0.1:0",
                tls=security.TlsConfig.for_identity(certs_dir, "coord-b"),
            )
        )
        await server.start()
        try:
            at = ["--coordinator", f"127.0.0.1:{server.port}", "--timeout", "3"]
            flags = ["--tls-ca", str(certs_dir / "ca.pem")]
            flags += ["--tls-cert", str(certs_dir / "operator.pem")]
            flags += ["--tls-key", str(certs_dir / "operator-key.pem")]
            status, _, err = await dtm(*at, *flags, "txn", "list")
            assert 1 == status
            assert "does not carry the identity 'coordinator'" in err, err
            assert "--coordinator-identity" in err and "is it running" not in err
            status, out, err = await dtm(
                *at, *flags, "--coordinator-identity", "coord-b", "txn", "list"
            )
            assert (0, "no transactions\n") == (status, out), err
            settings = tmp_path / "dtm.toml"
            settings.write_text('[cli]\ncoordinator_identity = "coord-b"\n', encoding="utf-8")
            status, out, err = await dtm(*at, *flags, "--config", str(settings), "txn", "list")
            assert (0, "no transactions\n") == (status, out), err
            # A certificate of another CA, and no certificate at all.
            rogue = ["--tls-ca", str(rogue_dir / "ca.pem")]
            rogue += ["--tls-cert", str(rogue_dir / "client.pem")]
            rogue += ["--tls-key", str(rogue_dir / "client-key.pem")]
            status, _, err = await dtm(
                *at, *rogue, "--coordinator-identity", "coord-b", "txn", "list"
            )
            assert 1 == status and "TLS handshake failed" in err, err
            status, _, err = await dtm(*at, "txn", "list")
            assert 1 == status and "does it require TLS?" in err, err
            # dtm force does not take a failed handshake for an unreachable coordinator. The
            # coordinator's own port stands for a participant from before Describe: it
            # answers UNIMPLEMENTED, so the check asks the coordinator --coordinator names.
            force = ["force", "t-1", "0", "--address", f"127.0.0.1:{server.port}", "--rollback"]
            status, _, err = await dtm(*at, *flags, *force, "--i-understand")
            assert 1 == status and "refusing to force t-1" in err, err
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())


def test_certs_for_one_more_identity_keep_the_ca_of_their_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m dtm.tools.certs --out DIR --identity X` into a directory in use made a new
    CA, orphaning every other certificate there (found by a bug hunt). It now signs with the
    CA already there; --new-ca replaces it on purpose; a bad --out is a usage error."""
    from cryptography import x509

    out = tmp_path / "certs"
    certs.main(["--out", str(out), "--identity", "inventory"])
    ca_before = (out / "ca.pem").read_bytes()
    certs.main(["--out", str(out), "--identity", "shop"])
    assert ca_before == (out / "ca.pem").read_bytes()
    assert "signed by the test CA already in" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate(ca_before)
    for identity in ("inventory", "shop"):
        issued = x509.load_pem_x509_certificate((out / f"{identity}.pem").read_bytes())
        issued.verify_directly_issued_by(ca)  # raises if not
        security.check_material(
            out / "ca.pem", out / f"{identity}.pem", out / f"{identity}-key.pem"
        )
    certs.main(["--out", str(out), "--identity", "shop", "--new-ca"])
    assert "a new test CA" in capsys.readouterr().out
    assert ca_before != (out / "ca.pem").read_bytes()
    # Half a CA is refused rather than silently replaced.
    (out / "ca-key.pem").unlink()
    with pytest.raises(SystemExit) as done:
        certs.main(["--out", str(out), "--identity", "shop"])
    assert 2 == done.value.code
    err = capsys.readouterr().err
    assert "ca-key.pem is not" in err and "--new-ca" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n", encoding="utf-8")
    with pytest.raises(SystemExit) as done:
        certs.main(["--out", str(blocker / "certs")])
    err = capsys.readouterr().err
    assert 2 == done.value.code and "cannot write to" in err and "Traceback" not in err


def test_the_certs_tool_names_the_file_it_cannot_write_and_leaves_its_pair_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory where a certificate goes: the key was replaced first, then writing the
    certificate failed, and the error named only the output directory ("cannot write to
    DIR: Is a directory"; found by a bug hunt). The error names the file, and the key it
    would have replaced is untouched, as is every other file there."""
    out = certs.generate(tmp_path / "certs", ["orders"])
    (out / "orders.pem").unlink()
    (out / "orders.pem").mkdir()
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    with pytest.raises(SystemExit) as done:
        certs.main(["--out", str(out), "--identity", "orders"])
    err = capsys.readouterr().err
    assert 2 == done.value.code and "Traceback" not in err
    assert f"cannot write to {out / 'orders.pem'}: Is a directory" in err, err
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert before == after  # orders-key.pem included, and no temporary file left behind
    assert (out / "orders.pem").is_dir()


def test_expired_certificates_are_refused_where_they_are_made_and_where_they_are_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing read a certificate's dates (found by a bug hunt): `python -m dtm.tools.certs`
    signed new certificates with a CA expired for a month, exit 0, and a process started with
    an expired certificate or CA served, every handshake then failing as "Socket closed" or
    "certificate verify failed"."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    out = tmp_path / "certs"
    certs.generate(out, ["inventory"], now=now - 400 * day)

    # The tool: an expired CA is refused, naming --new-ca; --new-ca makes certificates that work.
    with pytest.raises(SystemExit) as done:
        certs.main(["--out", str(out), "--identity", "orders"])
    err = capsys.readouterr().err
    assert 2 == done.value.code and "expired on" in err and "--new-ca" in err, err
    assert not (out / "orders.pem").exists()

    def load(directory: Path, identity: str) -> None:
        cert, key = directory / f"{identity}.pem", directory / f"{identity}-key.pem"
        security.check_material(directory / "ca.pem", cert, key)

    # A process: an expired certificate (of an expired CA).
    with pytest.raises(security.TlsMaterialError, match=r"--tls-cert \S*inventory.pem expired on"):
        load(out, "inventory")
    certs.main(["--out", str(out), "--identity", "orders", "--new-ca"])
    capsys.readouterr()
    load(out, "orders")
    # An expired certificate of a valid CA; one not valid yet; a valid one of an expired CA.
    ended = now - 35 * day
    signed_by(out, "orders", now - 400 * day, ended)
    with pytest.raises(
        security.TlsMaterialError, match="orders.pem expired on " + f"{ended:%Y-%m-%d}"
    ):
        load(out, "orders")
    signed_by(out, "orders", now + 2 * day, now + 300 * day)
    with pytest.raises(security.TlsMaterialError, match=r"orders\.pem is not valid before"):
        load(out, "orders")
    old = tmp_path / "old"
    certs.generate(old, ["client"], now=now - 400 * day)
    signed_by(old, "client", now - day, now + day)
    with pytest.raises(security.TlsMaterialError, match=r"--tls-ca \S*ca.pem expired on"):
        load(old, "client")


def signed_by(
    directory: Path, identity: str, since: datetime.datetime, until: datetime.datetime
) -> None:
    """Rewrite IDENTITY.pem in `directory`, signed by its CA, valid from `since` to `until`
    (dates the certs tool would not write)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    key = serialization.load_pem_private_key((directory / f"{identity}-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(since)
        .not_valid_after(until)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{identity}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_the_certs_tool_never_signs_past_its_cas_expiry_and_warns_near_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate is valid VALID_DAYS or until its CA expires, whichever comes first; a CA
    about to expire is reused with a warning."""
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    out = tmp_path / "certs"
    certs.generate(out, ["inventory"], now=now - datetime.timedelta(days=350))
    certs.main(["--out", str(out), "--identity", "orders"])
    captured = capsys.readouterr()
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    orders = x509.load_pem_x509_certificate((out / "orders.pem").read_bytes())
    assert ca.not_valid_after_utc == orders.not_valid_after_utc
    assert "valid until " + ca.not_valid_after_utc.strftime("%Y-%m-%d") in captured.out
    assert "warning: the test CA" in captured.err and "--new-ca" in captured.err


def test_the_dtm_command_says_when_the_coordinators_certificate_has_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator whose certificate expired while it ran: the dtm command said "its
    certificate is not signed by the CA given", sending the operator after the wrong file
    (found by a bug hunt)."""
    from tests.cli_runner import dtm

    for name in list(os.environ):
        if name.startswith("DTM_"):
            monkeypatch.delenv(name)
    certs_dir = certs.generate(tmp_path / "certs")
    now = datetime.datetime.now(datetime.UTC)
    signed_by(
        certs_dir,
        "coordinator",
        now - datetime.timedelta(days=400),
        now - datetime.timedelta(days=35),
    )

    async def scenario() -> None:
        # Not through from_options, which now refuses the file: as if it expired while serving.
        server = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path / "data",
                listen="127.0.0.1:0",
                tls=security.TlsConfig.for_identity(certs_dir, "coordinator"),
            )
        )
        await server.start()
        try:
            flags = ["--coordinator", f"127.0.0.1:{server.port}", "--timeout", "3"]
            flags += ["--tls-ca", str(certs_dir / "ca.pem")]
            flags += ["--tls-cert", str(certs_dir / "operator.pem")]
            flags += ["--tls-key", str(certs_dir / "operator-key.pem")]
            status, _, err = await dtm(*flags, "txn", "list")
            assert 1 == status and "has expired" in err, err
            assert "not signed by the CA" not in err, err
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())
