"""A real PostgreSQL server for the tests, from the Debian package: ``initdb`` into a temporary folder and
``pg_ctl`` start on 127.0.0.1 at a free port, one database per test, stopped at the end.

PostgreSQL refuses to run as root, and the tests (and CI) do run as root: the data folder then belongs to
the ``postgres`` user the package creates and every server command runs as that user (``runuser``).
The server trusts loopback connections and runs without fsync: it is thrown away after the session.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

REQUIRE_ENV = "TAILORLM_REQUIRE_POSTGRES"  # set (make test sets it): a missing server fails, not skips
SERVER_USER = "postgres"  # the account the Debian package creates
SUPERUSER = "tailorlm"  # the role initdb creates; the tests connect as it


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One throwaway server. ``url(database)`` is how the tests reach it; ``new_database()`` gives each
    test its own."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.home = Path(tempfile.mkdtemp(prefix="tailorlm-pg-"))
        self.data = self.home / "data"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        self._names = itertools.count()
        if self._as_root:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.home, account.pw_uid, account.pw_gid)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", SERVER_USER, "--"] if self._as_root else []
        result = subprocess.run(
            [*prefix, str(self.bin_dir / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync")
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the server on its existing data (after ``halt``), on the same port."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.home} -F -c max_connections=200"
        log = self.home / "server.log"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(log), "-w", "-t", "60", "start")
        return self

    def halt(self) -> None:
        """Stop the server at once, as a crash would, keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        credentials = SUPERUSER if password is None else f"{SUPERUSER}:{password}"
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database's URL (a copy of template1: a few hundred milliseconds)."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
