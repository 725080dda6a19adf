"""A private, throw-away PostgreSQL cluster for tests (initdb + pg_ctl on 127.0.0.1).

The server refuses to run as root, so as root the cluster belongs to the ``postgres`` system
user (``runuser``); its folder lives directly under the system temp dir because pytest's
``tmp_path`` is private to root and the server could not reach it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Cluster:
    bindir: Path
    root: Path
    port: int
    run_as: str | None

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        _run(self, ["pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def find_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: $ROCKCLS_PG_BIN, Debian's layout, or PATH."""
    candidates = [os.environ.get("ROCKCLS_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(str(Path(initdb).parent) if initdb else "")
    for cand in filter(None, candidates):
        if (Path(cand) / "initdb").is_file() and (Path(cand) / "pg_ctl").is_file():
            return Path(cand)
    return None


def _version_key(path: str) -> int:
    part = Path(path).parent.name
    return int(part) if part.isdigit() else 0


def unavailable_reason() -> str:
    """Why no cluster can be started here ('' when one can)."""
    if find_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        return "running as root without a 'postgres' user and runuser to start the server as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    return ""


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster() -> Cluster:
    """initdb a new cluster (trust auth, superuser ``postgres``) and start it on a free port."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(unavailable_reason())
    root = Path(tempfile.mkdtemp(prefix="rockcls-pg-"))
    run_as = "postgres" if os.geteuid() == 0 else None
    if run_as:
        shutil.chown(root, user=run_as)
    cluster = Cluster(bindir, root, free_port(), run_as)
    try:
        _run(cluster, ["initdb", "-D", str(root / "data"), "--auth=trust", "-U", "postgres", "-E", "UTF8"])
        options = f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {root} -c fsync=off"
        _run(cluster, ["pg_ctl", "-D", str(root / "data"), "-o", options, "-l", str(root / "server.log"),
                       "-w", "-t", "60", "start"])
    except BaseException:
        log = root / "server.log"
        detail = log.read_text()[-2000:] if log.is_file() else ""
        cluster.stop()
        raise RuntimeError(f"could not start PostgreSQL: {detail}") from None
    return cluster


def _run(cluster: Cluster, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(cluster.bindir / cmd[0]), *cmd[1:]]
    if cluster.run_as:
        cmd = ["runuser", "-u", cluster.run_as, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cluster.root)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-1000:]}")
    return proc
