"""The operator commands of `python -m dtm.cluster` (up, down, status) on real processes.

Most tests stand in for the servers with sleeping processes whose command line looks like one
`Cluster.command` builds: what `down` and `status` decide from is the pidfiles and
/proc/PID/cmdline, and a sleeper makes those exact without the seconds a real start takes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import astuple
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cluster
from dtm.cluster import COORDINATOR, PROCESSES, Cluster, Ports, free_ports, runner
from dtm.cluster import ports as cluster_ports
from tests.processes import held_lock, processes_of, sleeper

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists(), reason="needs /proc to tell whose a process is"
)


def test_down_of_a_copied_data_dir_leaves_the_original_cluster_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, copy = tmp_path / "live", tmp_path / "copy"
    with sleeper(COORDINATOR, live) as process:
        shutil.copytree(live, copy)  # e.g. a backup taken while it runs: same pidfiles
        assert not Cluster.attach(copy).running(COORDINATOR)
        assert 0 == cluster.main(["down", "--data-dir", str(copy), "--grace", "1"])
        assert "nothing was running" in capsys.readouterr().out
        assert process.poll() is None, "`down --data-dir COPY` stopped another data dir's process"

        assert Cluster.attach(live).running(COORDINATOR)
        assert 0 == cluster.main(["down", "--data-dir", str(live), "--grace", "1"])
        assert "stopped coordinator" in capsys.readouterr().out
        assert process.wait(timeout=5) == -signal.SIGTERM


def up(data_dir: Path, *extra: str) -> int:
    return cluster.main(["up", "--data-dir", str(data_dir), "--ports", "free", *extra])


def test_attach_restores_the_extra_arguments_of_each_process(tmp_path: Path) -> None:
    extra = {"orders": ["--metrics-listen", "127.0.0.1:9999"], COORDINATOR: ["--x"]}
    Cluster(tmp_path, Ports.free(), extra_args=extra)._write_state()
    attached = Cluster.attach(tmp_path)
    assert attached.command("orders")[-2:] == ["--metrics-listen", "127.0.0.1:9999"]
    assert attached.command(COORDINATOR)[-1] == "--x"
    assert "--metrics-listen" not in attached.command("payment")


def scrape(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return int(answer.status)
    except OSError:
        return 0


def test_a_service_restarted_by_a_second_up_keeps_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--metrics-ports free`: five free /metrics ports `up` chooses (and moves one another
    program takes first), not ports a test chose and let go before the servers bound them.
    `up` says which: it printed none, so an operator had to read cluster.json."""
    try:
        assert 0 == up(tmp_path, "--metrics-ports", "free")
        address = Cluster.attach(tmp_path).metrics_address("orders")
        assert address is not None
        assert re.search(rf"orders .* pid \d+ +metrics {address}\n", capsys.readouterr().out)
        orders_metrics = int(address.rpartition(":")[2])
        assert 200 == scrape(orders_metrics)
        killed = Cluster.attach(tmp_path).kill("orders")
        assert killed is not None and 0 == scrape(orders_metrics)
        assert 0 == cluster.main(["up", "--data-dir", str(tmp_path)])  # starts orders again
        assert 200 == scrape(orders_metrics), "orders came back without its /metrics endpoint"
        # Asks for no ports in particular: those it runs on will do.
        assert 0 == up(tmp_path, "--metrics-ports", "free")
        assert address == Cluster.attach(tmp_path).metrics_address("orders")
    finally:
        cluster.main(["down", "--data-dir", str(tmp_path), "--grace", "2"])


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`python -m dtm.cluster ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        status = cluster.main(list(args))
    except SystemExit as done:  # argparse's usage errors
        status = done.code if isinstance(done.code, int) else -1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_up_reports_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text("{bad\n")
    (tmp_path / "list.json").write_text("[1]\n")
    (tmp_path / "file").write_text("not a directory\n")
    data = ["--data-dir", str(tmp_path / "data")]
    cases = [
        ([*data, "--metrics-ports", "abc"], 2, "--metrics-ports: give 5 ports"),
        ([*data, "--metrics-ports", "1,2,3,4,x"], 2, "ports are numbers 1..65535"),
        ([*data, "--ports", "1,2,3,4,70000"], 2, "ports are numbers 1..65535"),
        ([*data, "--initial", str(tmp_path / "none.json")], 1, "No such file or directory"),
        ([*data, "--initial", str(tmp_path / "bad.json")], 1, "bad.json is not valid JSON"),
        ([*data, "--initial", str(tmp_path / "list.json")], 1, "must be a JSON object"),
        # Which level of the path is the file, not "[Errno 17] File exists" alone.
        (["--data-dir", str(tmp_path / "file" / "x")], 1, f"{tmp_path / 'file'} is a file)"),
        (["--data-dir", str(tmp_path / "file")], 1, f"{tmp_path / 'file'} is a file)"),
    ]
    for args, expected, message in cases:
        status, out, err = run(capsys, "up", *args)
        assert (expected, "", True) == (status, out, message in err), (args, err)
        assert "Traceback" not in err and "Errno" not in err, err
    assert not (tmp_path / "data" / "pids").exists()  # nothing was started


def test_down_and_status_survive_a_cut_short_cluster_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sleeper(COORDINATOR, tmp_path) as coordinator, sleeper("orders", tmp_path) as orders:
        (tmp_path / "cluster.json").write_text('{"host": "127.0.0.1", "po')
        status, out, err = run(capsys, "status", "--data-dir", str(tmp_path))
        assert (1, "") == (status, out)
        assert "cluster.json is not valid JSON" in err
        assert f"coordinator (pid {coordinator.pid}), orders (pid {orders.pid})" in err
        status, _, err = run(capsys, "up", "--data-dir", str(tmp_path))
        assert (1, True) == (status, "stop its processes with `down` first" in err)

        status, out, err = run(capsys, "down", "--data-dir", str(tmp_path), "--grace", "1")
        assert (0, "stopped coordinator, orders\n") == (status, out)
        assert "stopping the processes its pidfiles name" in err
        assert (-signal.SIGTERM, -signal.SIGTERM) == (coordinator.wait(5), orders.wait(5))


def test_cluster_json_is_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Cluster(tmp_path, Ports(coordinator=1))._write_state()
    before = (tmp_path / "cluster.json").read_text()

    def crash(source: object, target: object) -> None:
        raise OSError("the machine went down before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="before the rename"):
        Cluster(tmp_path, Ports(coordinator=2))._write_state()
    assert before == (tmp_path / "cluster.json").read_text()
    assert 1 == Cluster.attach(tmp_path).ports.coordinator


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    # The ports the kernel gives outgoing connections, any of which could take a port
    # between its probe and its server's bind.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        ports = free_ports(len(PROCESSES))
        assert len(set(ports)) == len(PROCESSES)
        assert all(1024 <= port < low for port in ports), (ports, low)


def test_free_ports_skip_a_port_in_use_and_fall_back_to_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        # Room for two ports below the range, one of them in use: one is chosen there, the
        # kernel picks the other two.
        monkeypatch.setattr(cluster_ports, "PORT_FLOOR", port - 1)
        monkeypatch.setattr(cluster_ports, "_ephemeral_range", lambda: (port + 1, 60999))
        ports = free_ports(3)
    assert port - 1 == ports[0] or not can_bind(port - 1)
    assert port not in ports and len(set(ports)) == 3


def test_up_on_the_port_of_a_running_coordinator_fails_and_registers_nothing_there(
    tmp_path: Path,
) -> None:
    """Health checks on the coordinator's port were answered by the coordinator already
    there, so `up` went on before its own had even tried to bind: its services registered
    with the other cluster's coordinator, taking over its names, and `up` could report
    ready. A process started by `up` is ready only once it listens on its port itself."""
    running = Cluster(tmp_path / "a", Ports.free())
    running.start()
    try:
        before = running.registered()
        mine = free_ports(len(PROCESSES))
        clashing = Ports(running.ports.coordinator, *mine[1:])
        second = Cluster(tmp_path / "b", clashing, start_timeout_s=20.0)
        with pytest.raises(cluster.ClusterError, match="coordinator"):
            second.start()
        assert before == running.registered()  # nobody took over its services' names
    finally:
        running.stop()


@pytest.mark.parametrize("name", [COORDINATOR, "orders"])
def test_a_free_port_taken_before_its_server_binds_it_is_chosen_again(
    tmp_path: Path, name: str
) -> None:
    """`Ports.free()` chooses ports that another program may bind before the server does
    (test_node_example failed so once, on a machine busy with other test runs). Here one is
    taken on purpose between the choice and the start: the process whose port it was starts
    on another free port, and the cluster is ready with it and records it."""
    ports = Ports.free()
    with socket.socket() as thief:
        # As servers bind (SO_REUSEADDR): a port a killed process left in TIME_WAIT is
        # taken all the same (without, the test itself failed to bind: EADDRINUSE).
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", ports.of(name)))
        thief.listen()
        running = Cluster(tmp_path, ports)
        try:
            running.start()
            assert ports.of(name) != running.ports.of(name)
            assert running.service_addresses == running.registered()
            assert "SERVING" == running.health(name)
            assert running.ports == Cluster.attach(tmp_path).ports
            others = [other for other in PROCESSES if other != name]
            assert [ports.of(other) for other in others] == [
                running.ports.of(other) for other in others
            ]
        finally:
            running.stop()


@pytest.mark.parametrize("name", [COORDINATOR, "orders"])
def test_a_free_metrics_port_taken_before_its_server_binds_it_is_chosen_again(
    tmp_path: Path, name: str
) -> None:
    """The /metrics ports, when free_ports chose them (FreePorts), move as the gRPC ones do:
    here one is taken between the choice and the start, and the process serves /metrics on
    another free port, which cluster.json records."""
    ports = Ports.free()
    metrics = Ports.free(avoid=astuple(ports))
    with socket.socket() as thief:
        # As servers bind (SO_REUSEADDR): a port a killed process left in TIME_WAIT is
        # taken all the same (without, the test itself failed to bind: EADDRINUSE).
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", metrics.of(name)))
        thief.listen()
        running = Cluster(tmp_path, ports, metrics_ports=metrics)
        try:
            running.start()
            moved = running.metrics_address(name)
            assert moved is not None and moved != f"127.0.0.1:{metrics.of(name)}"
            assert 200 == scrape(int(moved.rpartition(":")[2]))
            assert ports == running.ports
            assert moved == Cluster.attach(tmp_path).metrics_address(name)
            others = [other for other in PROCESSES if other != name]
            assert [f"127.0.0.1:{metrics.of(other)}" for other in others] == [
                running.metrics_address(other) for other in others
            ]
        finally:
            running.stop()


def test_a_restart_whose_port_another_program_took_says_which_and_what_to_do(
    tmp_path: Path,
) -> None:
    """A restarted process keeps its port (its clients keep the address), so a port another
    program took while it was down fails the restart: the error names the port, the program
    holding it (here this test's process) and what to do, instead of "exited with code 1"."""
    running = Cluster(tmp_path, Ports.free())
    running.start()
    try:
        port = running.ports.payment
        running.terminate("payment")
        with socket.socket() as thief:
            # As servers bind (SO_REUSEADDR): a port a killed process left in TIME_WAIT is
            # taken all the same (without, the test itself failed to bind: EADDRINUSE).
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            thief.bind(("127.0.0.1", port))
            thief.listen()
            with pytest.raises(cluster.PortTakenError) as raised:
                running.restart("payment")
        text = str(raised.value)
        assert (raised.value.name, raised.value.port) == ("payment", port)
        assert f"port {port} (127.0.0.1:{port}) is held by pid {os.getpid()} (" in text, text
        assert f"`kill {os.getpid()}`" in text and "then start it again" in text, text
        assert port == running.ports.payment  # not moved
    finally:
        running.stop()


def test_a_restart_whose_port_the_clusters_own_process_holds_is_not_blamed_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port held by one of the cluster's own running processes (an old incarnation still
    up, two processes given one port) is the cluster's failure: a PortTakenError said "another
    program bound that port first", and chaos counted it as the environment's, not as a
    failure (found by a review). Here /proc is made to name orders as the holder."""
    running = Cluster(tmp_path, Ports.free())
    running.start()
    try:
        port = running.ports.payment
        orders = running.pid("orders")
        monkeypatch.setattr(runner, "_port_holders", lambda held: [orders])
        running.terminate("payment")
        with socket.socket() as thief:
            # As servers bind (SO_REUSEADDR): a port a killed process left in TIME_WAIT is
            # taken all the same (without, the test itself failed to bind: EADDRINUSE).
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            thief.bind(("127.0.0.1", port))
            thief.listen()
            with pytest.raises(cluster.ClusterError) as raised:
                running.restart("payment")
        assert not isinstance(raised.value, cluster.PortTakenError), raised.value
        assert "another program" not in str(raised.value), raised.value
    finally:
        running.stop()


def test_a_coordinator_restarted_under_running_services_does_not_move(tmp_path: Path) -> None:
    """The services dial the coordinator at the address they were started with: `start` of
    a cluster whose services run (a chaos heal) must not move the coordinator to another free
    port (its services would not find it); its taken port is a PortTakenError."""
    running = Cluster(tmp_path, Ports.free())
    running.start()
    try:
        port = running.ports.coordinator
        running.kill(COORDINATOR)
        with socket.socket() as thief:
            # As servers bind (SO_REUSEADDR): a port a killed process left in TIME_WAIT is
            # taken all the same (without, the test itself failed to bind: EADDRINUSE).
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            thief.bind(("127.0.0.1", port))
            thief.listen()
            with pytest.raises(cluster.PortTakenError, match=f"port {port} "):
                running.start()
        assert port == running.ports.coordinator
        assert all(running.running(name) for name in cluster.SERVICES)
    finally:
        running.stop()


def test_up_on_free_ports_moves_a_process_whose_port_was_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up --ports free` chooses the ports itself, so it may move a process whose port was
    taken between the choice and the bind (here the coordinator's, taken on purpose); a
    second `up --ports free` asks for no ports in particular: already running."""
    thieves: list[socket.socket] = []
    choose = cluster_ports.free_ports

    def then_take_the_first(count: int, host: str = "127.0.0.1") -> list[int]:
        ports = choose(count, host)
        if not thieves:
            thieves.append(socket.socket())
            thieves[0].bind((host, ports[0]))
            thieves[0].listen()
        return ports

    monkeypatch.setattr(cluster_ports, "free_ports", then_take_the_first)
    at = ["--data-dir", str(tmp_path), "--ports", "free"]
    try:
        status, out, err = run(capsys, "up", *at, "--metrics-ports", "off")
        assert 0 == status, err
        taken = thieves[0].getsockname()[1]
        ports = Cluster.attach(tmp_path).ports
        assert taken != ports.coordinator and f"127.0.0.1:{ports.coordinator}" in out
        status, out, err = run(capsys, "up", *at)
        assert (0, True) == (status, "already running" in out), err
    finally:
        cluster.main(["down", "--data-dir", str(tmp_path), "--grace", "2"])
        for thief in thieves:
            thief.close()


def test_up_on_a_running_cluster_with_other_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up --tls-dir certs` on a running plaintext cluster said "already running" and left
    it plaintext (found by a bug hunt); with a process down, it restarted that one with the
    old settings. Now it is refused, naming the difference; flags left out, or equal to the
    running cluster's, still mean "already running" or "start the others"."""
    data = tmp_path / "data"
    ports = Ports.free()
    data.mkdir()
    Cluster(data, ports)._write_state()
    # Sleepers serve nothing: take them as ready, as real servers would be.
    monkeypatch.setattr(Cluster, "_not_ready", lambda *_, **__: None)
    port_list = ",".join(str(ports.of(name)) for name in PROCESSES)
    with contextlib.ExitStack() as stack:
        sleepers = {name: stack.enter_context(sleeper(name, data)) for name in PROCESSES}
        at = ["up", "--data-dir", str(data)]
        status, out, err = run(capsys, *at, "--tls-dir", str(tmp_path / "certs"))
        assert 1 == status, out
        assert "running with different settings (tls_dir none ->" in err
        assert "run `down` first" in err and "already running" not in out
        status, out, err = run(capsys, *at, "--test-control", "--metrics-ports", "off")
        assert 1 == status and "test_control off -> on" in err
        assert "metrics" not in err  # none recorded, none asked for
        status, out, _ = run(capsys, *at, "--ports", port_list)
        assert (0, True) == (status, "already running" in out)
        status, out, _ = run(capsys, *at)
        assert (0, True) == (status, "already running" in out)
        # The same initial file again is no change, though it names only the stock.
        initial = tmp_path / "initial.json"
        initial.write_text(json.dumps({"stock": {"sku-apple": 5}}))
        Cluster(data, ports, initial={"stock": {"sku-apple": 5}})._write_state()
        # What `up` wrote for the services: both keys.
        services = {"stock": {"sku-apple": 5}, "accounts": {}}
        (data / "initial.json").write_text(json.dumps(services))
        status, out, err = run(capsys, *at, "--initial", str(initial))
        assert (0, True) == (status, "already running" in out), err
        # A process down: the others' settings still decide, and nothing is started.
        sleepers["orders"].kill()
        sleepers["orders"].wait()
        status, out, err = run(capsys, *at, "--tls-dir", str(tmp_path / "certs"))
        assert 1 == status and "running with different settings" in err
        assert "partly running" not in out
        assert not Cluster.attach(data).running("orders")


def test_a_malformed_initial_document_is_described_not_a_traceback() -> None:
    """`up` names what differs from the running cluster's settings; a malformed --initial
    document made that description raise (TypeError, IndexError) instead (a review's find)."""
    for document in ({"stock": None}, {"stock": 5}, {"stock": [], "accounts": []}):
        assert cluster._setting_text(document).startswith("(a document: "), document


def test_processes_of_reads_past_a_command_line_that_is_not_utf_8(tmp_path: Path) -> None:
    """Another program's arguments need not be UTF-8: processes_of failed with
    UnicodeDecodeError, and so did the demo's signal test it ends with, while a process of
    the machine had a \\xff in its command line (seen once here)."""
    command = [sys.executable.encode(), b"-c", b"import time; time.sleep(60)", b"\xff"]
    stranger = subprocess.Popen(command, start_new_session=True)
    try:
        with sleeper(COORDINATOR, tmp_path) as process:
            assert [process.pid] == processes_of(tmp_path)
    finally:
        stranger.kill()
        stranger.wait()


def test_up_and_down_fail_at_once_while_another_command_holds_the_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `up`s at once on one data dir left the cluster broken and out of reach of `down`
    (found by a bug hunt). `up` and `down` now hold DIR/cluster.lock; a second one fails."""
    try:
        with sleeper(COORDINATOR, tmp_path) as process, held_lock(tmp_path):
            status, out, err = run(capsys, "down", "--data-dir", str(tmp_path), "--grace", "1")
            assert 1 == status and "another dtm.cluster command is running on" in err
            assert process.poll() is None and (tmp_path / "pids" / "coordinator.pid").exists()
            process.kill()
            process.wait()
            ports = ",".join(str(port) for port in free_ports(len(PROCESSES)))
            at = ["--data-dir", str(tmp_path), "--ports", ports, "--metrics-ports", "off"]
            status, out, err = run(capsys, "up", *at)
            assert (1, "") == (status, out)
            assert f"another dtm.cluster command is running on {tmp_path.resolve()}" in err
            assert [] == processes_of(tmp_path)
    finally:
        cluster.main(["down", "--data-dir", str(tmp_path), "--grace", "2"])


def test_two_ups_at_once_leave_one_cluster_that_down_stops(tmp_path: Path) -> None:
    """The race itself, as the bug hunt ran it: two `python -m dtm.cluster up` at once."""
    command = [sys.executable, "-m", "dtm.cluster", "up", "--data-dir", str(tmp_path)]
    command += ["--ports", "free", "--metrics-ports", "off"]
    try:
        ups = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"
        ]
        results = [(up.wait(60), up.communicate()[1].decode()) for up in ups]
        assert 0 in [status for status, _ in results], results
        for status, err in results:
            assert status == 0 or "another dtm.cluster command is running" in err, results
        assert 0 == cluster.main(["status", "--data-dir", str(tmp_path)])
    finally:
        cluster.main(["down", "--data-dir", str(tmp_path), "--grace", "2"])
        left = processes_of(tmp_path)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert [] == left, "`down` left processes of the data dir running"


def test_a_start_over_a_live_process_of_the_data_dir_is_refused(tmp_path: Path) -> None:
    """`_spawn` overwrote pidfiles blindly: a demo on the data dir of a running cluster
    started a second coordinator there and took the first one's pidfile."""
    with sleeper(COORDINATOR, tmp_path) as process:
        second = Cluster(tmp_path, Ports.free())
        try:
            with pytest.raises(cluster.ClusterError, match=f"already runs .* as pid {process.pid}"):
                second.start()
        finally:
            second.stop(grace_s=2)
        assert process.poll() is None
        assert f"{process.pid}\n" == (tmp_path / "pids" / "coordinator.pid").read_text()


def test_stopping_leaves_a_pidfile_that_names_another_live_process(tmp_path: Path) -> None:
    """A failed `up` stopped what it had started and deleted every pidfile, the other `up`'s
    among them. A pidfile goes only when it names the process stopped, or none that runs."""
    with sleeper("orders", tmp_path) as process:
        Cluster(tmp_path).terminate("orders", grace_s=1)  # this object never saw it
        assert process.poll() is None
        assert f"{process.pid}\n" == (tmp_path / "pids" / "orders.pid").read_text()
    (tmp_path / "pids" / "payment.pid").write_text(f"{process.pid}\n")  # it is gone now
    Cluster(tmp_path).terminate("payment", grace_s=1)
    assert not (tmp_path / "pids" / "payment.pid").exists()


def test_down_says_which_process_it_had_to_kill_and_so_does_its_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A process that does not stop on SIGTERM (a hung server) is killed after the grace:
    `down` said "stopped payment" as after a graceful stop, and the log ended on the
    process's own last line, as if it still ran (an operator's hunt: a SIGSTOPped service)."""
    log = tmp_path / "logs" / "payment.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-11-30T00:00:00.000Z INFO    payment: registered\n")
    with sleeper("payment", tmp_path, hung=True) as process:
        status, out, err = run(capsys, "down", "--data-dir", str(tmp_path), "--grace", "0.5")
        assert -signal.SIGKILL == process.wait(timeout=10)
    assert 0 == status, err
    assert "stopped payment" in out
    assert "payment was still running 0.5 s after SIGTERM: killed (SIGKILL)" in err, err
    assert "in doubt, at its next start" in err and str(log) in err, err
    last = log.read_text().splitlines()[-1]
    assert "payment still running 0.5 s after SIGTERM: killed (SIGKILL)" in last, last


def test_timeout_and_grace_are_positive_finite_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--grace nan` was accepted and `down` never reached its deadline (it hung ~10 min on
    a process that ignored SIGTERM); `--timeout -1` failed with "not ready in time" (found
    by a bug hunt). They are now usage errors, as `dtm --timeout` makes them."""
    data = ["--data-dir", str(tmp_path / "data"), "--metrics-ports", "off"]
    data += ["--ports", ",".join(str(port) for port in free_ports(len(PROCESSES)))]
    try:
        for command, flag in (("up", "--timeout"), ("down", "--grace"), ("up", "--grace")):
            for value in ("nan", "inf", "-inf", "0", "-1", "abc"):
                status, out, err = run(capsys, command, *data, f"{flag}={value}")
                assert (2, "") == (status, out), (command, flag, value, err)
                assert f"argument {flag}: '{value}'" in err, err
        assert not (tmp_path / "data").exists()  # nothing was started, nothing locked
        status, _, err = run(capsys, "down", *data, "--grace", "0.5")
        assert 0 == status, err
    finally:
        cluster.main(["down", "--data-dir", str(tmp_path / "data"), "--grace", "2"])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        # Each of these was written to cluster.json: the coordinator refused it at its start,
        # and every later `up` refused the data dir for what it recorded.
        ("--prepare-timeout-ms", "0", "'0': out of range: allowed 1..600000"),
        ("--prepare-timeout-ms", "-5", "'-5': out of range: allowed 1..600000"),
        ("--prepare-timeout-ms", "600001", "'600001': out of range: allowed 1..600000"),
        ("--prepare-timeout-ms", "2.5", "'2.5': expected an integer between 1 and 600000"),
        # Five processes on one port: all but one failed to bind.
        (
            "--ports",
            "20000,20001,20000,20003,20004",
            "'20000,20001,20000,20003,20004': 20000 is given twice",
        ),
        (
            "--metrics-ports",
            "9100,9100,9102,9103,9104",
            "'9100,9100,9102,9103,9104': 9100 is given twice",
        ),
        # Finite, but an `up` that waits until then never ends.
        ("--timeout", "1e300", "'1e300': at most 3600 s"),
        ("--grace", "3601", "'3601': at most 3600 s"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    data_dir = tmp_path / "data"
    # Free ports and no /metrics, so that an `up` that took the value starts nothing another
    # cluster of this machine uses.
    others = {
        "--ports": ",".join(str(port) for port in free_ports(len(PROCESSES))),
        "--metrics-ports": "off",
    }
    args = [f"{name}={text}" for name, text in others.items() if name != flag]
    try:
        for command in ("up", "down", "status"):
            status, out, err = run(
                capsys, command, "--data-dir", str(data_dir), *args, f"{flag}={value}"
            )
            assert (2, "") == (status, out), (command, err)
            assert f"argument {flag}: {message}" in err, err
            assert "Traceback" not in err
        assert not data_dir.exists()
    finally:
        cluster.main(["down", "--data-dir", str(data_dir), "--grace", "2"])


def test_the_grpc_and_metrics_ports_given_must_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    ports = free_ports(len(PROCESSES) + 4)
    given = ["--ports", ",".join(str(port) for port in ports[:5])]
    given += [
        "--metrics-ports",
        ",".join(str(port) for port in [*ports[5:7], ports[2], *ports[7:]]),
    ]
    try:
        status, out, err = run(capsys, "up", "--data-dir", str(data_dir), *given)
        assert (2, "") == (status, out), err
        assert f"--metrics-ports: {ports[2]} is also in --ports" in err, err
        assert not data_dir.exists()
    finally:
        cluster.main(["down", "--data-dir", str(data_dir), "--grace", "2"])


def test_up_fails_at_once_naming_a_service_that_exits_while_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service that exits while starting (here: every service refuses the initial stock)
    fails `up` as soon as it is seen gone: by name, with its exit status and the end of its
    log, not with "not ready in time" after --timeout; the processes it started are stopped."""
    initial = tmp_path / "initial.json"
    initial.write_text(json.dumps({"stock": {"sku-1": -5}}))
    data_dir = tmp_path / "data"
    try:
        status, _, err = run(
            capsys,
            "up",
            "--data-dir",
            str(data_dir),
            "--ports",
            "free",
            "--metrics-ports",
            "off",
            "--initial",
            str(initial),
            "--timeout",
            "120",
        )
        assert 1 == status, err
        # Whichever of the four is seen gone first.
        logs = re.escape(str(data_dir.resolve() / "logs"))
        pattern = (
            rf"up failed: (\w+) \(pid \d+\) exited with code 2 while starting; {logs}/(\w+)\.log"
        )
        found = re.match(pattern, err)
        assert found is not None and found[1] == found[2] and found[1] in cluster.SERVICES, err
        assert "stock['sku-1'] must be between 0 and" in err
        assert "not ready in time" not in err
        assert [] == processes_of(data_dir)
    finally:
        cluster.main(["down", "--data-dir", str(data_dir), "--grace", "2"])


def test_status_and_up_check_that_each_service_is_registered_at_its_own_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` said "registered yes" and exited 0 while another process held a service's
    name (or after `dtm participants remove`), and `up` said "already running" while every
    order failed NOT_FOUND (found by a bug hunt)."""
    from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc

    data = ["--data-dir", str(tmp_path)]
    try:
        assert 0 == up(tmp_path, "--metrics-ports", "off")
        status, out, _ = run(capsys, "status", *data)
        assert 0 == status and out.count(" yes\n") == 4, out
        running = Cluster.attach(tmp_path)
        with grpc.insecure_channel(running.coordinator_address) as channel:
            coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.RegisterParticipantRequest(
                name="payment", address="127.0.0.1:1", incarnation="impostor"
            )
            coordinator.RegisterParticipant(request, timeout=5)
            payment = running.pid("payment")
            status, out, _ = run(capsys, "status", *data)
            assert 3 == status, out
            assert "no (another at 127.0.0.1:1)" in out.splitlines()[4], out
            # Below the table, what `up` says of it (the same words) and what to do.
            assert "the coordinator now lists it at 127.0.0.1:1" in out, out
            assert f"`kill {payment}`) and run `up` again" in out, out
            # Payment registered when it started and never will again: said at once, not
            # after waiting out --timeout for it (which then said only "not ready in time").
            status, out, err = run(capsys, "up", *data, "--timeout", "60")
            assert (1, "") == (status, out), err
            assert f"payment (pid {payment}) registered with the coordinator when it" in err
            assert "the coordinator now lists it at 127.0.0.1:1" in err, err
            assert f"`kill {payment}`) and run `up` again" in err, err
            assert "not ready in time" not in err and "waiting up to" not in err, err

            coordinator.UnregisterParticipant(
                coordinator_pb2.UnregisterParticipantRequest(name="payment"), timeout=5
            )
            status, out, _ = run(capsys, "status", *data)
            assert 3 == status and out.splitlines()[4].endswith(" no"), out
            assert "the coordinator now does not list it" in out, out
            assert f"`kill {payment}`) and run `up` again" in out, out
            status, out, err = run(capsys, "up", *data, "--timeout", "60")
            assert (1, "") == (status, out), err
            assert "the coordinator now does not list it" in err, err
            assert "`dtm participants remove payment`" in err, err
            assert "not ready in time" not in err and "waiting up to" not in err, err
            # As it says: stopped, and started anew by `up`, payment registers again.
            Cluster.attach(tmp_path).terminate("payment")
            status, out, err = run(capsys, "up", *data)
            assert 0 == status and "starting the others" in out, err
            status, out, _ = run(capsys, "status", *data)
            assert 0 == status and out.count(" yes\n") == 4, out

            # The coordinator down: no service can be told registered or not ("registered
            # no" for every one of them sent an operator after four registrations).
            Cluster.attach(tmp_path).kill(COORDINATOR)
            status, out, _ = run(capsys, "status", *data)
            services = out.splitlines()[2:]
            assert 3 == status and 4 == len(services), out
            assert all(line.endswith(" unknown (coordinator down)") for line in services), out
    finally:
        cluster.main(["down", *data, "--grace", "2"])


def test_a_registration_counts_only_since_the_services_last_start(tmp_path: Path) -> None:
    """`up` fails at once for a service whose log says it registered, since its last start
    only: a registration of an earlier run (the log is kept across them) says nothing of the
    process now starting, which registers on its own."""
    found = Cluster(tmp_path, Ports.free())
    log = found.log_path("payment")
    log.parent.mkdir(parents=True)
    registered = "2026-01-01T00:00:00.000Z INFO    payment: registered coordinator=x address=y\n"
    other = "2026-01-01T00:00:00.000Z INFO    orders: registered coordinator=x address=y\n"
    start = "\n==== 2026-01-01T00:00:00 starting payment\n"
    log.write_text(registered + start + other)
    assert not found._registered_since_start("payment")
    log.write_text(start + registered + start)
    assert not found._registered_since_start("payment")
    log.write_text(start + registered)
    assert found._registered_since_start("payment")
    assert not found._registered_since_start("orders")  # no log at all


def test_up_after_down_starts_the_cluster_cluster_json_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`down` then `up` without --tls-dir brought a TLS cluster back in plaintext, on the
    default ports, without a word (found by a bug hunt). A stopped cluster now starts again
    with what cluster.json records, but what the flags give, and says so."""
    started: list[Cluster] = []
    monkeypatch.setattr(Cluster, "start", lambda self: started.append(self))
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "operator.pem", "operator-key.pem"):
        (certs / name).write_text("not checked here\n")
    data = tmp_path / "data"
    data.mkdir()
    ports = Ports.free()
    metrics = {"orders": ["--metrics-listen", "127.0.0.1:9999"]}
    Cluster(data, ports, test_control=True, tls_dir=certs, extra_args=metrics)._write_state()
    at = ["up", "--data-dir", str(data)]

    status, out, err = run(capsys, *at)
    assert 0 == status, err
    assert (ports, certs.resolve(), True, metrics) == (
        started[-1].ports,
        started[-1].tls_dir,
        started[-1].test_control,
        started[-1].extra_args,
    )
    assert f"settings from {data.resolve() / 'cluster.json'} (flags override them):\n  " in out
    assert f"tls_dir {certs.resolve()}" in out and "test_control on" in out

    other = Ports.free()
    other_text = ",".join(str(other.of(name)) for name in PROCESSES)
    status, out, err = run(capsys, *at, "--ports", other_text, "--no-test-control")
    assert (0, other, certs.resolve(), False) == (
        status,
        started[-1].ports,
        started[-1].tls_dir,
        started[-1].test_control,
    )
    assert "ports" not in out.split("(flags override them):\n")[1].splitlines()[0]

    status, out, err = run(capsys, *at, "--tls-dir", "off")
    assert (0, None) == (status, started[-1].tls_dir)
    assert "WARNING: --tls-dir off: this cluster ran with mutual TLS" in err
    assert "PLAINTEXT" in err

    # Free /metrics ports for every process, besides the recorded gRPC ports: movable.
    status, out, err = run(capsys, *at, "--metrics-ports", "free")
    restarted = started[-1]
    chosen = [restarted.metrics_address(name) for name in PROCESSES]
    assert (0, ports) == (status, restarted.ports), err
    assert isinstance(restarted.metrics_ports, cluster.FreePorts)
    assert chosen == [f"127.0.0.1:{restarted.metrics_ports.of(name)}" for name in PROCESSES]
    assert not set(astuple(restarted.metrics_ports)) & set(astuple(ports))

    (certs / "ca.pem").unlink()  # the certificates moved
    count = len(started)
    status, out, err = run(capsys, *at)
    assert (1, count) == (status, len(started))
    assert f"{certs.resolve() / 'ca.pem'} is missing (tls_dir of " in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_status_with_the_recorded_tls_dir_moved_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probes' TLS files were read where cluster.json said: once moved, `status` ended
    in a FileNotFoundError traceback (found by a bug hunt)."""
    Cluster(tmp_path, Ports.free(), tls_dir=tmp_path / "moved")._write_state()
    with sleeper(COORDINATOR, tmp_path) as process:
        status, out, err = run(capsys, "status", "--data-dir", str(tmp_path))
    assert (1, "") == (status, out)
    assert f"{tmp_path.resolve() / 'moved' / 'ca.pem'} is missing" in err
    assert f"coordinator (pid {process.pid})" in err and len(err.splitlines()) == 1


class ClosedPipe:
    """A standard output whose reader went away (`status | head -1`)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("no file descriptor here")


def test_a_reader_gone_away_ends_the_command_quietly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status | head -1` ended in a BrokenPipeError traceback, and `up | head -1` said "up
    failed: Broken pipe" with exit 1 (found by a bug hunt). Now they exit as `dtm` does:
    141, nothing on stderr."""
    with sleeper(COORDINATOR, tmp_path):
        data = ["--data-dir", str(tmp_path)]
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        status, _, err = run(capsys, "status", *data)
        assert (141, "") == (status, err)
        status, _, err = run(capsys, "down", *data, "--grace", "1")
        assert (141, "") == (status, err)
    monkeypatch.setattr(Cluster, "_not_ready", lambda *_, **__: None)
    with contextlib.ExitStack() as stack:
        for name in PROCESSES:
            stack.enter_context(sleeper(name, tmp_path))
        status, _, err = run(capsys, "up", *data)  # "already running"
        assert (141, "") == (status, err)


def test_up_refuses_a_cluster_json_it_cannot_use_rather_than_starting_from_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS cluster whose initial.json went missing (or with a typo in cluster.json) came
    back in PLAINTEXT on the default ports, and cluster.json was rewritten without its
    tls_dir, with one line on stderr (found by a bug hunt). `up` now refuses, names the
    problem and how to go on; only flags that give every setting replace the file."""
    started: list[Cluster] = []
    monkeypatch.setattr(Cluster, "start", lambda self: started.append(self))
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "operator.pem", "operator-key.pem"):
        (certs / name).write_text("not checked here\n")
    data = tmp_path / "data"
    data.mkdir()
    ports = Ports.free()
    recorded = Cluster(data, ports, initial={"stock": {}}, tls_dir=certs)
    recorded._write_state()
    state_text = (data / "cluster.json").read_text()
    at = ["up", "--data-dir", str(data)]

    status, out, err = run(capsys, *at, "--metrics-ports", "off")  # initial.json is gone
    assert (1, "", []) == (status, out, started)
    assert '"initial": true), but cannot read' in err and "initial.json" in err
    assert "nothing was started" in err and "remove it to start from the flags" in err
    assert "(missing: --ports, --tls-dir DIR|off, --[no-]test-control)" in err
    assert state_text == (data / "cluster.json").read_text(), "cluster.json was rewritten"

    state = json.loads(state_text)
    state["initial"] = False
    for edit in ({"tls-dir": None}, {"extra_args": {"inventroy": []}}, {"ports": [1, 2]}):
        (data / "cluster.json").write_text(json.dumps({**state, **edit}))
        status, out, err = run(capsys, *at)
        assert (1, "", []) == (status, out, started), edit
        assert "does not describe a cluster" in err and "nothing was started" in err, err

    # Every setting by flag: the unreadable file is replaced, and says so.
    other = ",".join(str(port) for port in free_ports(len(PROCESSES)))
    flags = ["--ports", other, "--tls-dir", str(certs), "--no-test-control"]
    status, out, err = run(capsys, *at, *flags, "--metrics-ports", "off")
    assert (0, 1) == (status, len(started)), err
    assert (certs.resolve(), {}) == (started[0].tls_dir, started[0].extra_args)
    assert "replacing it with the settings the flags give" in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"test_control": "false"}, '"test_control" must be true or false, not "false"'),
        ({"initial": 1}, '"initial" must be true or false, not 1'),
        ({"host": 7}, '"host" must be a non-empty string, not 7'),
        ({"prepare_timeout_ms": "100"}, '"prepare_timeout_ms" must be null or a number'),
        ({"transaction_timeout_ms": 0}, '"transaction_timeout_ms" must be null or a number'),
        ({"tls_dir": ["x"]}, '"tls_dir" must be null (plaintext) or a directory'),
        ({"extra_args": {"inventory": "--x"}}, '"extra_args"."inventory" must be a list of'),
        ({"extra_args": {"inventory": [1]}}, '"extra_args"."inventory" must be a list of'),
        ({"extra_args": {"nope": []}}, '"extra_args" key "nope" must be one of coordinator'),
        ({"extra_args": []}, '"extra_args" must be an object of process names, not []'),
        ({"tls-dir": "/x"}, 'unknown key "tls-dir"'),
        ({"ports": [1, 2, 3, 4, 5]}, '"ports" must be an object with coordinator'),
        ({"ports": None}, '"ports" must be an object with coordinator'),
        ({"ports": {"coordinator": 0}}, '"ports"."coordinator" must be a number 1..65535, not 0'),
        ({"ports": {"orders": 99999}}, '"ports"."orders" must be a number 1..65535, not 99999'),
        ({"ports": {"payment": "abc"}}, '"ports"."payment" must be a number 1..65535, not "abc"'),
        ({"ports": {"payment": True}}, '"ports"."payment" must be a number 1..65535, not true'),
        ({"ports": {"notification": None}}, '"ports"."notification" must be recorded'),
        ({"ports": {"notifcation": 1}}, '"ports" key "notifcation" must be one of'),
        ({"drop": "ports"}, '"ports" must be recorded'),
    ],
)
def test_attach_checks_each_recorded_setting_and_names_the_key(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    """`"test_control": "false"` turned fault injection on (bool("false")), extra_args
    "--x" became three arguments, and ports 0, 99999 or "abc" reached the servers, a
    missing one its default (found by a bug hunt)."""
    Cluster(tmp_path, Ports.free())._write_state()
    path = tmp_path / "cluster.json"
    state = json.loads(path.read_text())
    edit = dict(edit)
    if "drop" in edit:
        del state[str(edit.pop("drop"))]
    elif isinstance(edit.get("ports"), dict):
        ports = {**state["ports"], **edit.pop("ports")}  # type: ignore[dict-item]
        state["ports"] = {name: port for name, port in ports.items() if port is not None}
    state.update(edit)
    path.write_text(json.dumps(state))
    with pytest.raises(cluster.ClusterStateError) as raised:
        Cluster.attach(tmp_path)
    assert f"{path} does not describe a cluster: " in str(raised.value)
    assert message in str(raised.value)


def test_attach_takes_a_cluster_json_of_an_older_version(tmp_path: Path) -> None:
    """Files written before TLS and extra arguments lack those keys: their defaults."""
    ports = Ports.free()
    state = {"host": "127.0.0.1", "ports": {name: ports.of(name) for name in PROCESSES}}
    (tmp_path / "cluster.json").write_text(json.dumps({**state, "test_control": True}))
    attached = Cluster.attach(tmp_path)
    assert (ports, None, {}, True) == (
        attached.ports,
        attached.tls_dir,
        attached.extra_args,
        attached.test_control,
    )


@pytest.mark.parametrize(
    ("failure", "why"),
    [(errno.EROFS, "is on a read-only file system"), (errno.EACCES, "is not writable")],
)
def test_a_data_dir_that_cannot_be_written_is_named_not_the_lock_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    failure: int,
    why: str,
) -> None:
    """`up` on a read-only data dir said "cannot use the lock file DIR/cluster.lock: Read-only
    file system; ... remove it (or fix it)", a file that was not there (an operator's hunt,
    on a read-only bind mount). The file system is faked here: the tests run as root too,
    which writes in any directory."""
    real_open = os.open

    def refused(path: Any, flags: int, *args: Any) -> int:
        if Path(path).name == "cluster.lock":
            raise OSError(failure, os.strerror(failure), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refused)
    for command in ("up", "down"):
        status, out, err = run(capsys, command, "--data-dir", str(tmp_path))
        assert (1, "") == (status, out), err
        assert f"the data dir {tmp_path} {why}; `up`, `down` and the demo write there" in err
        assert "remove it" not in err and 1 == len(err.splitlines()), err


def test_an_empty_data_dir_is_a_usage_error_not_the_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up --data-dir ""` started a whole cluster in the working directory (cluster.json,
    pidfiles, logs and five logs of record beside the operator's files: an operator's hunt),
    where the servers refuse an empty data_dir."""
    monkeypatch.chdir(tmp_path)
    try:
        for command in ("up", "status", "down"):
            extra = ["--ports", "free", "--metrics-ports", "off"] if command == "up" else []
            status, out, err = run(capsys, command, "--data-dir", "", *extra)
            assert (2, "") == (status, out), err
            assert "argument --data-dir: '': expected a path, got an empty string" in err
        assert [] == list(tmp_path.iterdir())
    finally:
        cluster.main(["down", "--data-dir", str(tmp_path), "--grace", "2"])


def test_a_lock_file_that_cannot_be_one_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cluster.lock as a directory or a dangling symlink failed `up` and `down` with the raw
    OSError ("[Errno 21] Is a directory", "[Errno 2] ..."), naming neither the file nor a way
    out (found by a bug hunt)."""
    lock = tmp_path / "cluster.lock"
    for make, what in [
        (lambda: lock.mkdir(), "a directory"),
        (lambda: lock.symlink_to(tmp_path / "gone" / "lock"), "a dangling symlink to"),
    ]:
        make()
        for command in ("up", "down"):
            status, out, err = run(capsys, command, "--data-dir", str(tmp_path))
            assert (1, "") == (status, out), err
            assert f"cannot use the lock file {lock}: {what}" in err, err
            assert "remove it (or fix it)" in err and "`down` cannot stop" in err, err
            assert "Errno" not in err and 1 == len(err.splitlines()), err
        with pytest.raises(cluster.ClusterLockError), cluster.locked(tmp_path):
            pass
        if lock.is_symlink():
            lock.unlink()
        else:
            lock.rmdir()
    assert not (tmp_path / "pids").exists()


class _ProbedCluster:
    """What `status` asks of a Cluster, answered without processes: every one running at a
    fixed address, payment's health probe timed out."""

    def registered(self) -> dict[str, str]:
        return {name: self.address(name) for name in PROCESSES if name != COORDINATOR}

    def running(self, name: str) -> bool:
        return True

    def pid(self, name: str) -> int:
        return 1000 + PROCESSES.index(name)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{50050 + PROCESSES.index(name)}"

    def health(self, name: str) -> str:
        return "UNREACHABLE (DEADLINE_EXCEEDED)" if name == "payment" else "SERVING"

    def registration_lost(self, name: str) -> None:
        return None


def test_status_columns_fit_a_long_health(capsys: pytest.CaptureFixture[str]) -> None:
    """A health probe that timed out, "UNREACHABLE (DEADLINE_EXCEEDED)", overran the health
    column's fixed width: that row's registration sat one column off the others'."""
    from dtm.cluster.command import _print_status

    assert 3 == _print_status(_ProbedCluster())  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert 1 + len(PROCESSES) == len(lines), lines
    column = lines[0].index("registered")
    for line in lines[1:]:
        assert line[column - 2 : column] == "  " and line[column] != " ", lines
