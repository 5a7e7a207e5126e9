"""A real single-node Slurm cluster for the slurm runner's tests, brought up and torn down here.

`apt-get install -y slurm-wlm munge` (tests/slurm-setup.sh, run by .ci/run) provides the
daemons; this writes a minimal slurm.conf in a temporary folder (one node with this
machine's CPUs, `select/cons_tres`, `proctrack/linuxproc`, `task/none`, no accounting) and
starts `munged`, `slurmctld -D` and `slurmd -D` as child processes, stopped by their PIDs.
Its own munge socket and ports keep it apart from anything else on the machine.

Two partitions on the node: `cpu` (the default) and `urgent`, whose jobs preempt `cpu` jobs
(PreemptMode=CANCEL), so a test can preempt a job the way a busy cluster does. Neither has
GPUs, which the bad-input test relies on.

    python tests/slurm_cluster.py    # bring one up by hand; prints `export SLURM_CONF=...`, Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why no cluster can be brought up here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install -y slurm-wlm munge; see tests/slurm-setup.sh)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs as the submitting user; these tests need root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Cluster:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="llmcbench-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname().split(".")[0]
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text(f"""\
ClusterName=llmcbench-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2
""")

    def start(self, timeout_s: float = 60) -> "Cluster":
        self.write_config()
        r = self.root
        env = {**os.environ, **self.env}
        logs = {name: open(r / f"{name}.out", "wb") for name in DAEMONS}
        self.procs["munged"] = subprocess.Popen(
            [_exe("munged"), "-F", "--force", f"--socket={r / 'munge' / 'munge.socket'}", f"--key-file={r / 'munge' / 'munge.key'}",
             f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'munged.seed'}",
             f"--log-file={r / 'munge' / 'munged.log'}"], stdout=logs["munged"], stderr=subprocess.STDOUT, env=env)
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), 20, "munged")
        self.procs["slurmctld"] = subprocess.Popen([_exe("slurmctld"), "-D", "-i"], stdout=logs["slurmctld"],
                                                   stderr=subprocess.STDOUT, env=env)
        self.procs["slurmd"] = subprocess.Popen([_exe("slurmd"), "-D"], stdout=logs["slurmd"], stderr=subprocess.STDOUT, env=env)

        def idle() -> bool:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
            return p.returncode == 0 and "idle" in p.stdout

        self._wait(idle, timeout_s, "the Slurm node")
        return self

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        self.stop()
        logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(self.root.glob("*.out"))
                         + sorted(self.root.glob("*.log")))
        raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s\n{logs}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stderr or p.stdout}")
        return p

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--quiet", "--partition=cpu,urgent"], capture_output=True,
                           env={**os.environ, **self.env}, timeout=30)
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    why = missing()
    if why:
        raise SystemExit(why)
    with Cluster() as c:
        t0 = time.perf_counter()
        print(f"cluster up: export SLURM_CONF={c.conf}   (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
