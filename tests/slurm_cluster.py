"""A throwaway single-node SLURM cluster on 127.0.0.1 for tests.

``slurm_cluster()`` finds (or, where allowed, installs) Debian's ``slurmctld``/``slurmd``/``munge``,
writes a munge key and a ``slurm.conf`` with absolute paths into a temporary directory, starts
``munged``, ``slurmctld`` and ``slurmd`` in the foreground (so their pids are known), waits until the
node is idle, and exports ``SLURM_CONF`` so child processes (``sbatch``, ``make``, jobs) use it. On exit
the daemons are stopped by pid and the directory is removed.

Installation is attempted only as root and only when ``CI`` is set or ``WSSS_SLURM_INSTALL=1``; in all
other cases a missing package skips the test with the reason printed. ``WSSS_SLURM_KEEP=1`` keeps the
temporary directory (config, daemon logs) for debugging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

_logger = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(name, path=path)


def _missing() -> List[str]:
    return [b for b in BINARIES if _which(b) is None]


def _skip(reason: str) -> None:
    # Printed as well, so the reason shows in CI logs even without -rs.
    print(f"SKIP slurm: {reason}", flush=True)
    pytest.skip(reason)


def ensure_slurm_installed() -> Dict[str, str]:
    """Return the paths of the SLURM/munge binaries, installing the Debian packages if allowed.

    Skips the calling test (``pytest.skip``) when they are missing and cannot be installed.
    """
    missing = _missing()
    if missing:
        allowed = os.environ.get("CI") or os.environ.get("WSSS_SLURM_INSTALL") == "1"
        if not allowed:
            _skip(f"{', '.join(missing)} not found; install Debian's {' '.join(PACKAGES)} "
                  f"or set WSSS_SLURM_INSTALL=1 (as root) to let the test install them")
        if os.geteuid() != 0:
            _skip(f"{', '.join(missing)} not found and not root, so {' '.join(PACKAGES)} cannot be installed")
        if shutil.which("apt-get") is None:
            _skip(f"{', '.join(missing)} not found and there is no apt-get to install {' '.join(PACKAGES)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                _skip(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        missing = _missing()
        if missing:
            _skip(f"{', '.join(missing)} still missing after installing {' '.join(PACKAGES)}")
    return {b: str(_which(b)) for b in BINARIES}


def _free_port(start: int, *, exclude: int = -1) -> int:
    """The first port >= ``start`` (other than ``exclude``) that can be bound on all interfaces."""
    for port in range(start, start + 500):
        if port == exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {start}..{start + 499}")


@dataclass
class SlurmCluster:
    """A running single-node cluster; ``env`` holds the variables child processes need."""

    root: Path
    conf: Path
    node: str
    partition: str
    bins: Dict[str, str]
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run([self.bins.get(cmd[0], cmd[0]), *cmd[1:]], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout)

    def requeue(self, job_id: str, *, timeout: float = 60) -> None:
        """``scontrol requeue`` a running job (or array task ``<id>_<i>``) and let it start again at once."""
        self.run("scontrol", "requeue", job_id)
        self.start_now(job_id, timeout=timeout)

    def start_now(self, job_id: str, *, timeout: float = 300) -> None:
        """Make a requeued job eligible at once.

        slurmctld gives a requeued batch job a begin time about two minutes ahead; the tests reset it
        to now (``scontrol update StartTime=now``) so they do not wait. They first wait a few seconds:
        slurmd refuses a job credential created in the same second as the revocation of the killed
        run's credential ("Job credential revoked"), which fails the job instead of restarting it.
        """
        time.sleep(3.0)
        state = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("scontrol", "-o", "show", "job", job_id).stdout
            restarted = re.search(r"\bRestarts=([1-9]\d*)", state) is not None
            if restarted and re.search(r"JobState=(RUNNING|COMPLETING|COMPLETED)\b", state):
                return  # it already restarted on its own (slurmctld made it eligible without delay)
            if "JobState=PENDING" in state:
                if "Reason=BeginTime" not in state:
                    return
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(0.3)
        # A killed task can stay COMPLETING for a while on a loaded machine (KillWait, spawned CRF workers).
        raise RuntimeError(f"requeued job {job_id} did not become eligible within {timeout:.0f} s (last state: "
                           f"{state.strip()[:400]})\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        """The last lines of each daemon log (for failure messages)."""
        out = []
        for p in sorted((self.root / "log").glob("*")):
            if p.is_file() and p.stat().st_size:
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {p}\n" + "\n".join(lines))
        return "\n".join(out)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}\n{self.logs()}")
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=20)
            state = r.stdout.strip()
            if r.returncode == 0 and state.rstrip("*") == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.node} not idle after {timeout:.0f} s (sinfo: {state!r})\n{self.logs()}")

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait until none is left (their slurmstepd would outlive slurmd)."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        deadline = time.monotonic() + timeout
        left: List[str] = []
        while time.monotonic() < deadline:
            r = self.run("squeue", "-h", "-o", "%A %T", check=False, timeout=20)
            left = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
            if r.returncode != 0 or not left:
                return
            self.run("scancel", *sorted(set(left)), check=False, timeout=20)
            time.sleep(0.5)
        _logger.warning("jobs still listed after %.0f s: %s", timeout, left)

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons by pid (slurmd, slurmctld, munged; SIGKILL after 20 s)."""
        self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _logger.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait(timeout=10)


def _write_conf(root: Path, *, node: str, partition: str, cpus: int, ctld_port: int, slurmd_port: int,
                munge_socket: Path) -> Path:
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    lines = [
        "ClusterName=wsss-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # the node's CPUs as configured, even on a 1-CPU machine
        "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` for the test's lifetime
        "KillWait=5",
        "InactiveLimit=0",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@contextlib.contextmanager
def slurm_cluster(*, cpus: int = 2, partition: str = "debug") -> Iterator[SlurmCluster]:
    """Start a single-node cluster; yields a :class:`SlurmCluster` and sets ``SLURM_CONF`` meanwhile.

    Args:
        cpus: CPUs the node offers, whatever the machine has (``SlurmdParameters=config_overrides``).
        partition: name of the (default) partition.

    Skips the calling test where the packages are unavailable; raises RuntimeError when the daemons
    do not come up (with their log tails in the message).
    """
    bins = ensure_slurm_installed()
    if os.geteuid() != 0:
        _skip("the throwaway cluster runs slurmd as root (SlurmdUser=root); run the test as root")
    root = Path(tempfile.mkdtemp(prefix="wsss-slurm-"))
    cluster: Optional[SlurmCluster] = None
    old_conf = os.environ.get("SLURM_CONF")
    try:
        os.chmod(root, 0o755)  # munged refuses group/world-writable parents
        node = socket.gethostname().split(".")[0]
        munge_dir = root / "munge"
        munge_dir.mkdir(mode=0o700)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = munge_dir / "munge.socket"
        ctld_port = _free_port(16817)
        slurmd_port = _free_port(ctld_port + 1, exclude=ctld_port)
        conf = _write_conf(root, node=node, partition=partition, cpus=cpus, ctld_port=ctld_port,
                           slurmd_port=slurmd_port, munge_socket=munge_socket)
        cluster = SlurmCluster(root=root, conf=conf, node=node, partition=partition, bins=bins)
        logs = root / "log"
        with open(logs / "munged.stderr", "wb") as err:
            cluster.procs["munged"] = subprocess.Popen(
                [bins["munged"], "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                 f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
                 f"--log-file={logs / 'munged.log'}"], stdout=err, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not munge_socket.exists():
            if cluster.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{cluster.logs()}")
            time.sleep(0.1)
        os.environ["SLURM_CONF"] = str(conf)
        for name in ("slurmctld", "slurmd"):
            extra = ["-i"] if name == "slurmctld" else []  # -i: ignore (absent) saved state
            with open(logs / f"{name}.stderr", "wb") as err:
                cluster.procs[name] = subprocess.Popen([bins[name], "-D", "-f", str(conf), *extra],
                                                       env=cluster.env, stdout=err, stderr=subprocess.STDOUT)
            if name == "slurmctld":
                time.sleep(1.0)
        cluster.wait_idle()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if os.environ.get("WSSS_SLURM_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)
