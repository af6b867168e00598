"""Real servers for the tests: PostgreSQL in a temporary folder, `mlflow server`, and several
hosts on one machine as Linux network namespaces (each with its own address and host name).

Nothing here is a stand-in: the PostgreSQL binaries of the machine (`initdb`, `pg_ctl`), the
`mlflow server` of the environment, `ip netns` for the hosts. Where the machine lacks one of
them the tests that need it skip with the reason (`require_*`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

# characters a URL must percent-encode, so the tests see masking of the encoded form too
PASSWORD = 'pw"s3cr@t:/x'
USER = "bench"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH or in Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def namespace_problem() -> str | None:
    """Why this machine cannot make network namespaces for the tests, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root (ip netns)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    name = f"cmbprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be started here, or None."""
    if postgres_bin("initdb") is None or postgres_bin("pg_ctl") is None:
        return "the PostgreSQL server is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is not installed (pip install -e '.[postgres]')"
    return None


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` account then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class Host:
    """One namespace: a host with its own address and host name."""

    name: str  # the namespace
    hostname: str
    address: str

    def command(self, cmd: list[str]) -> list[str]:
        """cmd, run inside this host (its network and its host name)."""
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c",
                f'hostname {self.hostname} && exec "$@"', "sh", *cmd]


@dataclass
class Network:
    """Hosts on one bridge: 10.A.B.11, .12, ... /24, cleaned up on close. The test process
    reaches them through the bridge's own address 10.A.B.1 (a client: no server listens on
    it)."""

    hosts: list[Host]
    bridge: str
    _veths: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, count: int) -> Network:
        tag = f"{os.getpid() % 100000}"
        subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
        bridge = f"cmb{tag}"
        net = cls([], bridge)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(1, count + 1):
            host = Host(f"cmb{tag}h{i}", f"host{i}", f"{subnet}.{10 + i}")
            veth = f"cmb{tag}v{i}"
            _ip("netns", "add", host.name)
            net.hosts.append(host)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            net._veths.append(veth)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        return net

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "pids", host.name], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Postgres:
    """A PostgreSQL server in its own data folder, listening on `listen` (and loopback)."""

    def __init__(self, listen: str = "127.0.0.1", port: int | None = None,
                 host: Host | None = None, allow: str | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cmbench-pg-"))
        self.data = self.root / "data"
        self.listen = listen
        self.port = port or free_port()
        self.host = host
        self.allow = allow  # a subnet (CIDR) whose hosts may connect with the password
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")

    def _run(self, cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        full = _as_server_user(cmd)
        if self.host is not None:
            full = ["ip", "netns", "exec", self.host.name, *full]
        return subprocess.run(full, capture_output=True, text=True, check=True, **kwargs)

    def init(self) -> Postgres:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres")
        self._run([str(postgres_bin("initdb")), "-D", str(self.data), "-U", USER,
                   "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"])
        pwfile.unlink()
        if self.allow:
            with (self.data / "pg_hba.conf").open("a") as fh:
                fh.write(f"host all all {self.allow} scram-sha-256\n")
        return self

    def start(self) -> Postgres:
        addresses = ",".join(dict.fromkeys([self.listen, "127.0.0.1"]))
        self._run([str(postgres_bin("pg_ctl")), "-D", str(self.data), "-w", "-t", "60",
                   "-l", str(self.root / "server.log"), "-o",
                   f"-c listen_addresses={addresses} -p {self.port} -k {self.root} "
                   f"-c fsync=off -c max_connections=300", "start"])
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([str(postgres_bin("pg_ctl")), "-D", str(self.data), "-m", "fast", "-w",
                       "stop"])

    def restart(self) -> None:
        """A fast restart: every open connection is cut."""
        self.stop()
        self.start()

    def url(self, database: str, address: str | None = None) -> str:
        return (f"postgresql://{USER}:{quote(PASSWORD, safe='')}@{address or self.listen}:"
                f"{self.port}/{database}")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=self.listen, port=self.port, user=USER, password=PASSWORD,
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` with a backend store URL and served artifacts, on one host."""

    backend: str
    address: str
    port: int
    artifacts: Path
    host: Host | None = None
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self, timeout: float = 180.0) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", str(self.artifacts), "--host", self.address,
               "--port", str(self.port), "--workers", "1"]
        if self.host is not None:
            cmd = self.host.command(cmd)
        self.log = self.log or self.artifacts.parent / "mlflow-server.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer in {timeout} s")

    def healthy(self) -> bool:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{self.url}/health", timeout=2)
            return True
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def lab(hosts: int = 3) -> Iterator[tuple[Network, Postgres, MlflowServer]]:
    """`hosts` namespaces; the last runs PostgreSQL (databases optuna and mlflow) and an MLflow
    server on port 5000 backed by it, with artifacts served from a folder of its own."""
    net = Network.create(hosts)
    server = net.hosts[-1]
    pg: Postgres | None = None
    mlflow: MlflowServer | None = None
    try:
        subnet = server.address.rsplit(".", 1)[0] + ".0/24"
        pg = Postgres(listen=server.address, port=5432, host=server, allow=subnet).init().start()
        pg.create_database("optuna")
        pg.create_database("mlflow")
        mlflow = MlflowServer(pg.url("mlflow", "127.0.0.1"), server.address, 5000,
                              pg.root / "artifacts", host=server)
        (pg.root / "artifacts").mkdir()
        mlflow.start()
        yield net, pg, mlflow
    finally:
        if mlflow is not None:
            mlflow.stop()
        if pg is not None:
            pg.close()
        net.close()
