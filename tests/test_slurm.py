"""Slurm as a launcher, against a real Slurm: ranks from ``srun``, a job cancelled the way a
preemption or a time limit ends it (SIGTERM, then SIGKILL ``KillWait`` seconds later) that
leaves a complete checkpoint and resumes equal to an uninterrupted run, and the sbatch template
(slurm/pretrain.sbatch) that, signalled ahead of its time limit, saves, requeues itself and
finishes.

The cluster is this machine (tests/slurm_cluster.py: munged, slurmctld and slurmd from the
distribution's packages, started as root in a temp dir); the tests skip, with the reason, where
Slurm is not installed or cannot start. The runs are test_pretrain_e2e.py's phase 1 (bert-tiny, 2
CPU ranks, 6 steps), compared with its uninterrupted ``mpiexec`` run.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN, expand_hostlist, launcher_rank, slurm_env
from tests.pretrain_helpers import PHASE1, ROOT, RUN, STEPS, check_stopped, env, losses
from tests.slurm_cluster import SlurmCluster, why_not

KILL_WAIT = 10  # s from a cancel's SIGTERM to its SIGKILL: a step of these runs plus a save fit easily


# -- the host-list syntax and the environment of a task (no cluster needed) -------------------------

@pytest.mark.parametrize("hostlist,hosts", [
    ("vm", ["vm"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10],login1", ["gpu8", "gpu9", "gpu10", "login1"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a[3],b[5-6],c", ["a3", "b5", "b6", "c"]),
])
def test_hostlists_expand_as_scontrol_does(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_a_bad_hostlist_names_the_range():
    with pytest.raises(ValueError, match=r"bad Slurm host list 'node\[3-1\]': range '3-1'"):
        expand_hostlist("node[3-1]")


TASK = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[003-006]", "SLURM_JOB_NODELIST": "gpu[001-008]",
        "SLURM_JOB_ID": "4242"}


def test_a_task_of_a_step_gets_rank_world_and_master():
    assert slurm_env(TASK) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                               "MASTER_PORT": str(SLURM_PORT_BASE + 4242)}
    # another job on the same nodes listens elsewhere; MASTER_PORT and MASTER_ADDR set by hand win
    assert slurm_env(dict(TASK, SLURM_JOB_ID="4243"))["MASTER_PORT"] == str(SLURM_PORT_BASE + 4243)
    assert slurm_env(dict(TASK, SLURM_JOB_ID=str(SLURM_PORT_SPAN + 7)))["MASTER_PORT"] == str(SLURM_PORT_BASE + 7)
    picked = slurm_env(dict(TASK, MASTER_PORT="29600", MASTER_ADDR="10.0.0.9"))
    assert (picked["MASTER_ADDR"], picked["MASTER_PORT"]) == ("10.0.0.9", "29600")


def test_a_batch_script_is_no_rank():
    """The batch shell has SLURM_PROCID=0 and the allocation's SLURM_NTASKS but no step: a plain
    ``python`` there must not wait for ranks that were never started."""
    batch = {k: v for k, v in TASK.items() if not k.startswith("SLURM_STEP")}
    assert slurm_env(batch) == {} and slurm_env({}) == {}
    assert launcher_rank(batch) == 0


def test_the_rank_is_known_before_the_process_group():
    """One rank prints the messages of the checks made before init_distributed: the launcher's rank."""
    assert launcher_rank(TASK) == 5 and launcher_rank({}) == 0
    assert launcher_rank(dict(TASK, RANK="3")) == 3  # a launcher started under srun sets its own
    assert launcher_rank({"PMI_RANK": "2"}) == 2 and launcher_rank({"OMPI_COMM_WORLD_RANK": "7"}) == 7


# -- a real cluster ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), kill_wait=KILL_WAIT)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        pytest.skip(f"Slurm could not start here: {exc}")
    yield cluster
    cluster.stop()


def job_env(slurm: SlurmCluster) -> dict:
    """The ranks' environment (tests.pretrain_helpers.env) talking to this cluster."""
    return {**{k: v for k, v in env().items() if not k.startswith("SLURM_")}, "SLURM_CONF": slurm.env["SLURM_CONF"]}


def wait_for(what: str, check, timeout: float, log: Path | None = None, interval: float = 0.2):
    deadline = time.time() + timeout
    while not (value := check()):
        if time.time() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s" + (f"\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(interval)
    return value


def job_id(slurm: SlurmCluster, name: str) -> str:
    return slurm.command("squeue", "-h", "-n", name, "-o", "%i").stdout.strip()


@pytest.mark.distributed
def test_srun_tasks_get_ranks_a_master_and_a_launcher_to_watch(slurm, tmp_path):
    probe = ("import json, os; from pretrain.distributed import slurm_env; from pretrain.stop import "
             "launcher_ancestors, _cmdline; print(json.dumps({**slurm_env(), 'JOB': os.environ['SLURM_JOB_ID'], "
             "'watch': [_cmdline(p).decode() for p in launcher_ancestors()]}))")
    proc = subprocess.run(["srun", "--ntasks", "2", sys.executable, "-c", probe], cwd=tmp_path, env=job_env(slurm),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tasks = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda t: t["RANK"])
    port = str(SLURM_PORT_BASE + int(tasks[0]["JOB"]) % SLURM_PORT_SPAN)
    assert [(t["RANK"], t["LOCAL_RANK"], t["WORLD_SIZE"], t["MASTER_ADDR"], t["MASTER_PORT"]) for t in tasks] == \
        [("0", "0", "2", slurm.node, port), ("1", "1", "2", slurm.node, port)]
    # each task's parent is the step daemon: the orphaned rank of a dead slurmstepd stops
    assert all(len(t["watch"]) == 1 and t["watch"][0].startswith("slurmstepd") for t in tasks), tasks
    # the parser agrees with Slurm's own
    lists = "node[01-04,07],gpu[8-10],rack[1-2]-n[1-2]"
    shown = slurm.command("scontrol", "show", "hostnames", lists).stdout.split()
    assert shown == expand_hostlist(lists)


def srun_phase1(slurm: SlurmCluster, cwd: Path, out: str, *extra: str) -> subprocess.Popen:
    log = open(cwd / f"{out}.log", "a")
    cmd = ["srun", "--ntasks", "2", "--kill-on-bad-exit=1", f"--job-name={out}", sys.executable, str(RUN), *PHASE1,
           "--output", out, *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=job_env(slurm), stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_cancelled_srun_job_saves_within_kill_wait_and_resumes_equal(slurm, phase1):
    """``scancel JOBID``: what a preemption or a time limit does to the ranks (SIGTERM, SIGKILL
    KillWait seconds later). The ranks must save and exit within the grace, and a new job with
    --resume must end where the uninterrupted run did."""
    work, out = phase1, "slurm_cancelled"
    proc = srun_phase1(slurm, work, out)
    log = work / f"{out}.log"
    try:
        wait_for("step 2 logged", lambda: (work / out / "metrics.jsonl").is_file() and max(losses(work / out),
                                                                                         default=0) >= 2, 240, log)
        job = job_id(slurm, out)
        cancelled = time.time()
        assert slurm.command("scancel", job).returncode == 0
        # the job is over once every rank has exited (by itself, or SIGKILLed at KillWait)
        wait_for("job ended", lambda: slurm.job(job).get("JobState") == "CANCELLED" and not job_id(slurm, out),
                 KILL_WAIT + 30, log)
        seconds = time.time() - cancelled
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    reached = check_stopped(work, out, text, seconds)
    assert "received SIGTERM" in text and "Killed" not in text, text[-3000:]  # no rank needed the SIGKILL
    assert seconds < KILL_WAIT, f"{seconds:.1f} s from the cancel to the job's end"

    resumed = srun_phase1(slurm, work, out, "--resume")
    assert resumed.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"world 2, global batch 16 = 4 x 2 accumulation x 2 ranks, steps {reached}->{STEPS}, resumed from " \
           f"step{reached:07d}" in text, text[-3000:]
    assert losses(work / out) == losses(work / "straight")  # every step, bitwise


@pytest.mark.slow
@pytest.mark.distributed
def test_the_sbatch_template_saves_requeues_itself_and_finishes(slurm, phase1):
    """``#SBATCH --signal=B:USR1@120`` signals the batch shell ahead of the time limit (delivered
    here at once, by ``scancel --signal=USR1 --batch``: Slurm checks time limits once a minute).
    The template passes it to the ranks, sees launch.sh report the phase unfinished, requeues the
    job, and the requeued job resumes and ends where the uninterrupted run did."""
    work = phase1
    log = work / "sbatch.log"
    assert PHASE1[0] == "--config" and PHASE1[2] == "--data"  # launch.sh's --config1 and --data-dir
    job_environment = dict(job_env(slurm), VENV=str(Path(sys.executable).parent.parent))
    submit = subprocess.run(
        ["sbatch", "--parsable", "--job-name=sbatch-test", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", f"--output={log}",
         str(ROOT / "slurm" / "pretrain.sbatch"), "--phase", "1", "--config1", PHASE1[1],
         "--data-dir", str(work / "data"), "--output-dir", str(work / "sbatch"), *PHASE1[4:]],
        cwd=ROOT, env=job_environment, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    run_dir = work / "sbatch" / "phase1"
    wait_for("step 2 logged", lambda: (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= 2,
             240, log)
    assert slurm.command("scancel", "--signal=USR1", "--batch", job).returncode == 0
    wait_for("the job requeued itself", lambda: slurm.job(job).get("Restarts") == "1", 120, log)
    # it starts again once its first run's credential has expired (CRED_EXPIRE here, 120 s by default)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    state = wait_for("job finished", lambda: (s := slurm.job(job)).get("JobState") in ended and s, 300, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-4000:]
    reached = int(re.search(r"stopped at step (\d+) on request \(received SIGUSR1\)", text).group(1))
    assert 2 <= reached < STEPS
    assert "requeueing job" in text and re.search(r"job \d+ on \S+, start 2,", text), text[-4000:]
    assert f"resumed from step{reached:07d}" in text and f"pretrain: done, {STEPS} steps" in text, text[-4000:]
    assert losses(run_dir) == losses(work / "straight")

    # a job requeued once more (or resubmitted) does not start the finished phase again
    again = subprocess.run([str(ROOT / "launch.sh"), "pretrain", "--launcher", "slurm", "--phase", "1", "--output-dir",
                            str(work / "sbatch"), "--resume"], cwd=ROOT, env=job_environment, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and f"phase 1: {run_dir} is finished already, skipping" in again.stderr, again.stderr
