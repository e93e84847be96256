"""Worker "hosts" of their own on this machine: Linux network namespaces joined to the root
namespace by veth links, each with its own host name, reaching the control plane's services
only over its link.

The services (PostgreSQL, MariaDB, Redis, OpenBao) listen on 127.0.0.1, which a namespace cannot
reach (its loopback is its own). ``ServiceAddress`` gives them one address of the root
namespace, ``10.200.X.1``, on which a small TCP forwarder (``python -m tests.netns``, a process
of its own) relays each port to 127.0.0.1. Every host routes that one address over its link and
nothing else, so what a host reaches, it reaches over its link: take the link down and the host
is gone. The forwarder closes a connection's other side when one side closes, as a server sees
a client process die; a link that goes silent is left open, as a server sees a vanished host.
(iptables DNAT with ``route_localnet`` would do the same in the kernel, but needs iptables,
absent here, and makes PostgreSQL see the links' addresses, which its pg_hba.conf does not
list.)

The host name comes from a UTS namespace of its own (``unshare --uts``), so runs record
``<host>:<pid>`` as they would on separate machines.
"""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def missing_capability():
    """Why worker hosts cannot be made here (not root, no ``ip`` or ``unshare``, network
    namespaces refused), or None. Tries ``ip netns add`` for real."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for binary in ("ip", "unshare", "hostname"):
        if shutil.which(binary) is None:
            return f"no `{binary}` on PATH"
    probe = f"mhprobe-{secrets.token_hex(3)}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args, netns=None, check=True):
    command = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def _free_subnet():
    """A 10.200.X.0/24 that no interface of this machine uses (X random: several test runs and
    benchmarks may make hosts at once)."""
    used = _ip("-o", "addr").stdout
    for _ in range(100):
        x = secrets.randbelow(254) + 1
        if f"10.200.{x}." not in used:
            return x
    raise RuntimeError("no free 10.200.X.0/24 for the worker hosts' links")


class ServiceAddress:
    """``10.200.X.1`` on the root namespace's loopback, with a forwarder relaying
    ``ports`` there to the same ports on 127.0.0.1."""

    def __init__(self, ports, log_path=os.devnull):
        self.subnet = _free_subnet()
        self.address = f"10.200.{self.subnet}.1"
        self.ports = sorted(set(ports))
        self.log_path = log_path
        self.forwarder = None

    def start(self, timeout=20):
        _ip("addr", "add", f"{self.address}/32", "dev", "lo")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.forwarder = subprocess.Popen(
            [sys.executable, "-m", "tests.netns", self.address, *map(str, self.ports)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        ready = self.forwarder.stdout.readline().decode().strip()
        if ready != "ready":
            self.stop()
            raise RuntimeError(f"the forwarder did not start: {ready!r}; see {self.log_path}")
        return self

    def url(self, url):
        """``url`` (or a ``host:port``) with 127.0.0.1 replaced by this address."""
        return url.replace("127.0.0.1", self.address).replace("localhost", self.address)

    def stop(self):
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.kill()
            self.forwarder.wait()
        _ip("addr", "del", f"{self.address}/32", "dev", "lo", check=False)


class WorkerHost:
    """A network namespace ``name`` linked to the root namespace (``10.200.X.(4n+1)`` on the
    root's side, ``.(4n+2)`` on its own), routing only the service address over the link."""

    def __init__(self, service, index, name):
        self.service = service
        self.index = index
        self.name = name
        self.netns = f"{name}-{secrets.token_hex(2)}"
        # veth names are at most 15 bytes.
        self.veth = f"mh{service.subnet}x{index}{secrets.token_hex(2)}"
        base = 4 * index
        self.root_side = f"10.200.{service.subnet}.{base + 1}"
        self.own_address = f"10.200.{service.subnet}.{base + 2}"
        self.processes = []

    def create(self):
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _ip("addr", "add", f"{self.root_side}/30", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("addr", "add", f"{self.own_address}/30", "dev", "eth0", netns=self.netns)
        _ip("link", "set", "eth0", "up", netns=self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)
        _ip("route", "add", f"{self.service.address}/32", "via", self.root_side, netns=self.netns)
        return self

    def popen(self, args, *, env, log_path):
        """Start ``args`` on this host (its namespace, its host name) in a process group of its
        own; returns the ``Popen``."""
        command = " ".join(_quote(a) for a in args)
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--uts",
                "sh",
                "-c",
                f"hostname {self.name} && exec {command}",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def kill(self):
        """SIGKILL every process started on this host (each one's whole group: the qcluster's
        sentinel, pusher, monitor and workers) and wait until they are gone; their sockets are
        closed by the kernel, as when a machine's processes die."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def cut(self):
        """Take the host's link down: nothing reaches it, nothing from it arrives."""
        _ip("link", "set", self.veth, "down", check=False)

    def terminate(self):
        """Ask what runs here to stop (SIGTERM to each started process: a qcluster's main
        process stops its own workers)."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def stop_processes(self, timeout=20):
        """Stop what runs here: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.processes = []

    def stop(self):
        """Stop what runs here and remove the namespace and its link."""
        self.stop_processes()
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.netns, check=False)


class LinkedPostgres:
    """A PostgreSQL server of its own (the machine's binaries, a throw-away data directory)
    listening on the service address itself: the worker hosts reach it over their links with no
    forwarder between, so it sees a vanished host as a real server does (its keepalives to that
    host go unanswered). Trusts the links' addresses; runs as the ``postgres`` user."""

    def __init__(self, service):
        import tempfile

        self.service = service
        self.host = service.address
        self.port = _free_port(service.address)
        # Under /tmp itself: the postgres user cannot enter a test's tmp_path (root's, 0700).
        self.workdir = Path(tempfile.mkdtemp(prefix="linked-postgres-"))
        self.data = self.workdir / "pgdata"
        self.process = None

    @staticmethod
    def binaries():
        """The directory of ``initdb`` and ``postgres`` of the newest installed server, or None."""
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=_major)
        return found[-1].parent if found else None

    def start(self, timeout=60):
        import psycopg

        bindir = self.binaries()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        shutil.chown(self.workdir, "postgres", "postgres")
        initdb = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stdout[-2000:]}{initdb.stderr[-2000:]}")
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all 10.200.{self.service.subnet}.0/24 trust\n")
        log = open(self.workdir / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bindir / "postgres"),
                "-D",
                str(self.data),
                "-c",
                f"listen_addresses={self.host}",
                "-p",
                str(self.port),
                "-c",
                f"unix_socket_directories={self.workdir}",
                "-c",
                "fsync=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited; see {self.workdir / 'postgres.log'}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError(f"postgres did not start in {timeout}s")

    def url(self, database):
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGQUIT)  # immediate shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _major(path):
    try:
        return int(path.parent.parent.name)
    except ValueError:
        return 0


def _free_port(address):
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _quote(arg):
    import shlex

    return shlex.quote(str(arg))


# --- The forwarder: python -m tests.netns ADDRESS PORT... -----------------------------------------


def _relay(source, sink, done):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
    done()


def _serve(server, port):
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ends = [2]
        lock = threading.Lock()

        def done(client=client, upstream=upstream, ends=ends, lock=lock):
            with lock:
                ends[0] -= 1
                last = ends[0] == 0
            if last:
                client.close()
                upstream.close()

        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=_relay, args=(source, sink, done), daemon=True).start()


def forward(address, ports):
    """Relay ``address:port`` to ``127.0.0.1:port`` for each port until killed."""
    for port in ports:
        server = socket.create_server((address, port), backlog=256)
        threading.Thread(target=_serve, args=(server, port), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    forward(sys.argv[1], [int(p) for p in sys.argv[2:]])
