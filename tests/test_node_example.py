"""The Node.js example (examples/node/place_order.js) places an order through a real cluster.

The example uses the registry's @grpc/grpc-js and @grpc/proto-loader against protos/, so this
test needs `node` and the example's node_modules. It uses examples/node/node_modules when it is
there (`npm install` in examples/node); otherwise it runs `npm ci` in a temporary copy of the
example, leaving the working tree alone. It skips, saying why, when node is missing or too old,
or when the packages cannot be installed because npm is missing or the registry is unreachable.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dtm import invariants
from dtm.cluster import Cluster, Ports

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
SCRIPT = "place_order.js"
#: What the script requires at run time; a node_modules without one of them is not usable.
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs")
NODE_MAJOR_MIN = 18
NPM_TIMEOUT_S = 180.0
SCRIPT_TIMEOUT_S = 60.0
ORDER_ID = "node-example-1"
# npm's own words for "could not reach the registry".
NETWORK_ERRORS = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|"
    r"network|socket hang up|getaddrinfo",
    re.IGNORECASE,
)

pytestmark = pytest.mark.slow


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the Node.js example cannot run")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    match = re.fullmatch(r"v(\d+)\..*", version)
    if match is None or int(match.group(1)) < NODE_MAJOR_MIN:
        pytest.skip(f"node {version or '(unknown version)'} is older than v{NODE_MAJOR_MIN}")
    return node


def _installed(directory: Path) -> bool:
    return all((directory / "node_modules" / name / "package.json").is_file() for name in PACKAGES)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _npm_error(text: str) -> str:
    """npm's summary lines ("npm error code ...", "npm error network ..."), or the tail."""
    summary = [
        line.strip()
        for line in text.splitlines()
        if re.match(r"npm (error|ERR!) (code|errno|network|syscall) ", line.strip())
    ]
    return "\n".join(summary[:4]) if summary else _tail(text)


def _install_copy(destination: Path) -> Path:
    """`npm ci` in a copy of the example at destination/examples/node (beside a link to
    protos/, which the script finds at ../../protos); the copy's directory."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(
            f"{EXAMPLE / 'node_modules'} is missing and npm is not on PATH to install it "
            "(run `npm install` in examples/node)"
        )
    copy = destination / "examples" / "node"
    copy.mkdir(parents=True)
    for name in ("package.json", "package-lock.json", SCRIPT):
        shutil.copy2(EXAMPLE / name, copy / name)
    (destination / "protos").symlink_to(ROOT / "protos", target_is_directory=True)
    command = [
        npm,
        "ci",
        "--no-audit",
        "--no-fund",
        "--ignore-scripts",
        "--prefer-offline",
        "--fetch-retries=1",
    ]
    try:
        result = subprocess.run(
            command,
            cwd=copy,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
            env={**os.environ, "npm_config_update_notifier": "false"},
        )
    except subprocess.TimeoutExpired:
        pytest.skip(
            f"examples/node/node_modules is missing and `npm ci` did not finish within "
            f"{NPM_TIMEOUT_S:g} s: the npm registry is unreachable or too slow"
        )
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        if NETWORK_ERRORS.search(output):
            pytest.skip(
                "examples/node/node_modules is missing and the npm registry is unreachable, "
                f"so `npm ci` could not install it:\n{_npm_error(output)}"
            )
        # Not the network: the example's package.json and package-lock.json disagree, or
        # similar. That is a defect of the example, not of the environment.
        pytest.fail(f"`npm ci` in a copy of examples/node failed:\n{_tail(output)}")
    if not _installed(copy):
        pytest.fail(f"`npm ci` succeeded but did not install {', '.join(PACKAGES)}")
    return copy


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(node, the directory to run place_order.js in, with its packages installed)."""
    node = _node()
    if _installed(EXAMPLE):
        return node, EXAMPLE
    return node, _install_copy(tmp_path_factory.mktemp("node-example"))


def test_node_example_places_an_order(example: tuple[str, Path], tmp_path: Path) -> None:
    node, directory = example
    # The default catalog (no `initial`): the script's sku-apple and acct-alice are in it.
    with Cluster(tmp_path / "cluster", Ports.free()) as cluster:
        result = subprocess.run(
            [node, SCRIPT, cluster.coordinator_address, ORDER_ID],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
            check=False,
        )
        output = f"{result.stdout}{result.stderr}"
        assert result.returncode == 0, f"place_order.js exited {result.returncode}:\n{output}"
        assert "COMMITTED" in result.stdout, output
        assert f"txn-{ORDER_ID}" in result.stdout, output

        # COMMITTED is answered once the decision is durable; phase 2 may still be running,
        # so wait until nothing is reserved, held, pending or staged.
        snapshot = asyncio.run(invariants.wait_until_settled(cluster.service_addresses))

    report = invariants.report(snapshot)
    assert report.violations == [], "\n".join(report.violations)
    orders = {order.order_id: order for order in snapshot.orders}
    assert orders[ORDER_ID].state == invariants.CONFIRMED
    assert orders[ORDER_ID].lines == (("sku-apple", 1),)
    assert orders[ORDER_ID].transaction_id == f"txn-{ORDER_ID}"
    stock = {level.sku: level for level in snapshot.stock}
    assert stock["sku-apple"].sold == 1
    captures = [capture for capture in snapshot.captures if capture.order_id == ORDER_ID]
    assert [(c.account_id, c.amount_cents) for c in captures] == [
        ("acct-alice", orders[ORDER_ID].amount_cents)
    ]
    assert [n.order_id for n in snapshot.sent] == [ORDER_ID]
    assert report.confirmed_orders == 1
