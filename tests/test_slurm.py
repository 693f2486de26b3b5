"""launch/slurm_multinode.sbatch under real SLURM: this test starts munged, slurmctld and
slurmd itself (one node: this machine), with the key, slurm.conf, state and spool all in a
temporary folder (``SLURM_CONF`` points the commands at it; /etc/slurm and /etc/munge are not
used), and submits the script with ``sbatch``, so it runs as a batch job and starts torchrun
through ``srun`` (CPU, gloo, 2 processes; ``GPUS_PER_NODE=2``).

- the script trains ``configs/large.yaml`` (small-model overrides) to the end, staging the
  store through an ``srun`` step (``STAGE_TO``);
- preemption as SLURM does it (``scontrol requeue``: SIGTERM to the job, then SLURM requeues
  it), then the time-limit warning the script asks for (``--signal=B:USR1@300``, sent here with
  ``scancel --batch --signal=USR1``: the script stops training and requeues the job itself);
  each time the requeued job resumes from the step checkpoint, and the three attempts together
  train on every particle exactly once per epoch (``debug.trace_samples``).

SLURM holds a requeued job for about two minutes before it may start again (EligibleTime = the
requeue + 121 s, observed with 22.05); the test releases it at once with ``scontrol update
JobId=N StartTime=now``, which an operator can do too.

Needs root and Debian's slurm-wlm and munge (``tests/setup/slurm.sh``, run by ``make test``);
skips, saying why, when they are missing or the daemons do not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from multihost import REPO, check_exactly_once, free_port, read_trace, tails

pytestmark = pytest.mark.slurm

SBATCH = REPO / "launch" / "slurm_multinode.sbatch"
LARGE = str(REPO / "configs" / "large.yaml")
EPOCHS = 2
SEED = 0  # large.yaml's train.seed (the default)
SHUFFLE_CHUNKS = 8  # large.yaml's train.shuffle_chunks
NPROC = 2  # torchrun processes on the one node (GPUS_PER_NODE)
TIMEOUT = 240  # generous: torch imports on two shared cores, and SLURM's scheduling passes
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=SBIN_PATH)


@dataclass
class Slurm:
    root: Path
    env: dict[str, str]
    node: str
    cpus: int
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def logs(self) -> list[Path]:
        return sorted((self.root / "log").glob("*.log"))

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                           timeout=60)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(cmd)}: rc {r.returncode}: {r.stdout}{r.stderr}\n{tails(self.logs())}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o``'s fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait_job(self, job_id: str, what: str, predicate, out: Path | None = None) -> dict[str, str]:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: timed out waiting for {what}; now {info.get('JobState')}, "
                             f"{info.get('Reason')}\n{tails([*self.logs(), *([out] if out else [])])}")


def _wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> str | None:
    """None once ``predicate()`` holds; else why not (the daemon ended, or the time ran out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return None
        if proc.poll() is not None:
            return f"{Path(proc.args[0]).name} exited with rc {proc.returncode} before {what}: {tails([log], 1500)}"
        time.sleep(0.2)
    return f"no {what} after {timeout:.0f}s: {tails([log], 1500)}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _node_line(env: dict[str, str]) -> tuple[str, int]:
    """This machine as slurmd sees it (``slurmd -C``): its node name and hardware, without
    RealMemory (free memory moves; a configured value above what slurmd later finds drains it)."""
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run([which("slurmd"), "-C"], env=env, capture_output=True, text=True, timeout=60)
    fields = dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    if r.returncode or not all(k in fields for k in keep):
        cpus = os.cpu_count() or 1
        return f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus}", cpus
    return f"NodeName={node} NodeAddr=127.0.0.1 " + " ".join(f"{k}={fields[k]}" for k in keep), int(fields["CPUs"])


def _write_config(root: Path, node_line: str, node: str) -> Path:
    conf = root / "slurm.conf"
    (root / "plugstack.conf").write_text("")  # not /etc/slurm's
    # cgroup.conf is read next to slurm.conf; the plugins below use no cgroups
    (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")
    conf.write_text(f"""\
ClusterName=distdrgntest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
MinJobAge=600
{node_line} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture(scope="module")
def slurm() -> Slurm:
    if os.geteuid() != 0:
        pytest.skip("the SLURM daemons run as root here (SlurmUser=root; slurmd starts jobs as their user)")
    if missing := [c for c in COMMANDS if which(c) is None]:
        pytest.skip(f"not installed: {', '.join(missing)} (tests/setup/slurm.sh installs slurm-wlm and munge)")
    # munged refuses a socket whose parent folders are not all searchable by everyone, and
    # pytest's tmp folders are 0700: a folder of its own under /tmp, 0755
    root = Path(tempfile.mkdtemp(prefix="distdrgn-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for d in ("munge", "state", "spool", "log"):
        (root / d).mkdir()
    (root / "munge").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job of an outer SLURM
    env.update(PATH=SBIN_PATH, SLURM_CONF=str(root / "slurm.conf"))
    node_line, cpus = _node_line(env)
    node = node_line.split()[0].split("=", 1)[1]
    _write_config(root, node_line, node)
    key = root / "munge" / "munge.key"
    with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(os.urandom(1024))
    cluster = Slurm(root, env, node, cpus)
    starts = {
        "munged": ["munged", "-F", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                   f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
                   f"--seed-file={root}/munge/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", str(root / "slurm.conf")],
        "slurmd": ["slurmd", "-D", "-f", str(root / "slurm.conf")],
    }
    ready = {
        "munged": (lambda: (root / "munge" / "munge.socket").exists(), "munge socket"),
        "slurmctld": (lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, "slurmctld answering"),
        "slurmd": (lambda: cluster.run("sinfo", "-h", "-N", "-n", node, "-o", "%T", check=False).stdout.strip()
                   == "idle", f"node {node} idle in sinfo"),
    }
    try:
        for name, cmd in starts.items():
            log = root / "log" / f"{name}.out.log"
            cluster.daemons[name] = subprocess.Popen([which(cmd[0]), *cmd[1:]], env=env, stdout=open(log, "ab"),
                                                     stderr=subprocess.STDOUT, start_new_session=True)
            if why := _wait_for(*ready[name], cluster.daemons[name], log):
                pytest.skip(f"SLURM did not start on this machine: {why}")
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                cluster.run("scancel", *jobs, check=False)
                deadline = time.time() + 60
                while time.time() < deadline and cluster.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.daemons:
                _stop(cluster.daemons[name])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(small_dataset):
    from distdrgn.store import ParticleStore

    return ParticleStore.open(small_dataset["store"])


def submit(slurm: Slurm, tmp_path: Path, train_args: list[str], **env) -> tuple[str, Path]:
    """sbatch the script on one node with ``NPROC`` CPU processes; the #SBATCH lines ask for 8
    GPUs and 64 CPUs per node, which the command line overrides (a CPU-only test node)."""
    out = tmp_path / "slurm-job.out"
    job_env = {**slurm.env, "PYTHON": sys.executable, "GPUS_PER_NODE": str(NPROC), "RDZV_PORT": str(free_port()),
               "MAX_RESTARTS": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    r = subprocess.run([which("sbatch"), "--parsable", "--nodes", "1", "--gpus-per-node=0",
                        f"--cpus-per-task={slurm.cpus}", f"--output={out}", f"--chdir={tmp_path}", str(SBATCH),
                        LARGE, *train_args], env=job_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(";")[0], out


def train_args(store_path: Path, run: Path, tiny_overrides, **extra) -> list[str]:
    settings = {"train.epochs": EPOCHS, "train.batch_size": 8, "train.num_workers": 0, "train.log_every": 1000,
                "metrics.port": "null", **extra}
    return tiny_overrides(store_path, run, **settings)


def ended(info: dict[str, str]) -> bool:
    return info["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")


def check_complete(run: Path, out: Path) -> None:
    from distdrgn.checkpoint import load_weights

    for name in ("config.yaml", "weights.pkl", "z.pkl", "weights.1.pkl", "weights.2.pkl", "loss.csv", "run.log"):
        assert (run / name).is_file(), f"{name} missing\n{tails([out, run / 'run.log'])}"
    assert f"{NPROC} process(es) on cpu" in (run / "run.log").read_text()
    assert load_weights(run / "weights.pkl")["epoch"] == EPOCHS


def test_sbatch_script_trains_as_a_slurm_job(slurm, small_dataset, tiny_overrides, tmp_path):
    """sbatch -> the batch script -> srun (staging step, then one torchrun per node) -> 2 ranks."""
    run, nvme = tmp_path / "run", tmp_path / "nvme"
    job_id, out = submit(slurm, tmp_path, train_args(small_dataset["store"], run, tiny_overrides), STAGE_TO=str(nvme))
    info = slurm.wait_job(job_id, "the job to end", ended, out)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tails([out, *slurm.logs()])
    check_complete(run, out)
    text = out.read_text()
    assert f"rendezvous {slurm.node}:" in text and f"1 node(s) x {NPROC} process(es)" in text
    staged = nvme / Path(small_dataset["store"]).name
    assert staged.is_dir() and f"store {staged}" in (run / "run.log").read_text()


def release(slurm, job_id: str) -> None:
    """Let a requeued job start now instead of after SLURM's ~2 min hold. slurmd revokes the old
    run's credential at the requeue and refuses a new one issued in the same second ("Killing
    non-startable batch JobId=N: Job credential revoked", seen once when the release came 0.3 s
    after the requeue), so the release waits until two whole seconds have passed."""
    time.sleep(2.0)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def test_preempted_then_time_limited_job_is_requeued_resumes_and_sees_each_particle_once(
        slurm, small_dataset, store, tiny_overrides, tmp_path):
    run, trace = tmp_path / "run", tmp_path / "trace"
    # a step checkpoint every 2 steps, and a delay per step so that SLURM's signals land mid-epoch
    args = train_args(small_dataset["store"], run, tiny_overrides, **{
        "train.checkpoint_every_steps": 2, "debug.trace_samples": str(trace), "debug.step_delay_s": 0.3})
    # MAX_RESTARTS=1: a resuming rank that reads config.yaml while rank 0 rewrites it fails once
    # (seen in tests/test_multinode.py; launch/README.md), and torchrun then restarts the ranks
    job_id, out = submit(slurm, tmp_path, args, MAX_RESTARTS="1")
    logs = [out, run / "run.log", *slurm.logs()]

    def training(after: tuple | None):
        """An attempt that resumed past ``after`` (None: any) has trained 3 steps on every rank."""
        def ready(info):
            assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (info["JobState"], tails(logs))
            return any(len(a["steps"]) >= NPROC * 3 and (after is None or a["resume"] > after)
                       for a in read_trace(trace).values())
        return ready

    def requeued(restarts: int):
        return lambda info: info["JobState"] == "PENDING" and int(info["Restarts"]) == restarts

    def newest_resume() -> tuple:
        return max(read_trace(trace).values(), key=lambda a: a["time"])["resume"]

    # 1. preemption: SIGTERM to every torchrun, the ranks checkpoint, SLURM requeues the job
    slurm.wait_job(job_id, "training in the first attempt", training(None), out)
    slurm.run("scontrol", "requeue", job_id)
    slurm.wait_job(job_id, "the requeue after scontrol requeue", requeued(1), out)
    release(slurm, job_id)
    # 2. the time-limit warning (--signal=B:USR1@300) to the batch shell: the script stops and requeues
    slurm.wait_job(job_id, "training in the second attempt", training(newest_resume()), out)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    slurm.wait_job(job_id, "the script's own requeue after SIGUSR1", requeued(2), out)
    release(slurm, job_id)
    info = slurm.wait_job(job_id, "the third attempt to finish", ended, out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), tails(logs)
    check_complete(run, out)

    text, log_text = out.read_text(), (run / "run.log").read_text()
    assert "SIGUSR1 (time limit near): stopping training at a checkpoint" in text
    assert text.count(f"requeueing job {job_id} to resume") == 1  # the script's, not after the preemption
    assert log_text.count("stopped by SIGTERM at epoch") >= 2, tails(logs)
    resumed = {line.split(" ", 2)[2] for line in log_text.splitlines() if "resumed from checkpoints/step." in line}
    assert len(resumed) == 2, resumed  # two resume points (a restarted round logs its point again)
    attempts = sorted(check_exactly_once(trace, store, EPOCHS, SEED, SHUFFLE_CHUNKS).values(), key=lambda a: a["time"])
    assert [a["world_size"] for a in attempts] == [NPROC] * 3
    resumes = [a["resume"] for a in attempts]
    assert resumes[1] > resumes[0] and resumes[2] > resumes[1], resumes  # each resumed past the last
    assert resumes[1] != (1, 0) and f"continuing at epoch {resumes[1][0]}, image {resumes[1][1]}" in log_text
