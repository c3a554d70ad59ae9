"""launch.sh: subcommands, argument parsing (dry run), and the README/CI entry points."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str, dry: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAUNCH_DRY_RUN="1" if dry else "0")
    return subprocess.run([str(ROOT / "launch.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_help_lists_every_subcommand():
    out = launch("help").stdout
    for sub in ("demo", "test", "prep", "pretrain", "squad", "export", "bench"):
        assert f"./launch.sh {sub}" in out


def test_unknown_subcommand_fails_with_help():
    proc = launch("pretrian")
    assert proc.returncode == 2 and "unknown subcommand 'pretrian'" in proc.stderr


def test_pretrain_both_phases_through_mpiexec():
    proc = launch("pretrain", "--launcher", "mpi", "--np", "2", "--data-dir", "D", "--output-dir", "O",
                  "--max-steps", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert re.match(r"\S*mpiexec -n 2 \S*python pretrain/run.py --config ds_configs/lamb_64k.json "
                    r"--data D/seq128 --output O/phase1 --max-steps 5", lines[0])
    assert "--config ds_configs/lamb_32k.json --data D/seq512 --output O/phase2 --init-checkpoint O/phase1" in lines[1]


def test_pretrain_phase2_with_hostfile_uses_deepspeed_launcher():
    proc = launch("pretrain", "--phase", "2", "--hostfile", "hosts", "--config2", "my.json", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() [1:] == ["-m", "deepspeed.launcher.runner", "--hostfile", "hosts", "pretrain/run.py",
                                        "--config", "my.json", "--resume"]


def test_pretrain_under_slurm_runs_each_phase_as_an_srun_step():
    proc = launch("pretrain", "--launcher", "slurm", "--np", "16", "--data-dir", "D", "--output-dir", "O",
                  "--resume")
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.strip().splitlines()]
    assert len(lines) == 2
    assert re.fullmatch(r"srun --ntasks 16 --kill-on-bad-exit=1 \S*python pretrain/run.py --config "
                        r"ds_configs/lamb_64k.json --data D/seq128 --output O/phase1 --resume", lines[0])
    assert lines[1].endswith("--output O/phase2 --init-checkpoint O/phase1 --resume")
    # without --np the allocation's task count decides
    proc = launch("pretrain", "--launcher", "slurm", "--phase", "2", "--output", "run2")
    assert proc.stdout.startswith("srun --kill-on-bad-exit=1 "), proc.stderr


@pytest.mark.parametrize("args,msg", [
    (("--phase", "3"), "--phase must be 1, 2 or both"),
    (("--launcher", "pbs"), "--launcher must be deepspeed, mpi or slurm (got 'pbs')"),
    (("--launcher", "mpi"), "--launcher mpi needs --np N"),
    (("--launcher", "slurm", "--hostfile", "h", "--output-dir", "O"), "--hostfile does not apply to --launcher slurm"),
    (("--launcher", "slurm"), "--launcher slurm needs --output-dir DIR (or --output)"),
])
def test_pretrain_bad_arguments(args, msg):
    proc = launch("pretrain", *args)
    assert proc.returncode == 2 and msg in proc.stderr


def test_squad_passes_arguments_through():
    proc = launch("squad", "--np", "2", "--checkpoint", "hf", "--output", "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-5:] == ["finetune/squad.py", "--checkpoint", "hf", "--output", "out"]
    assert "-m deepspeed.launcher.runner --num_gpus 2 finetune/squad.py" in proc.stdout


def test_readme_and_ci_run_the_same_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["./launch.sh demo", "./launch.sh test"]
    assert "./launch.sh test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_a_stopped_phase_1_does_not_start_phase_2(pretrain_work, tmp_path):
    """A phase that returns before its last step (here --stop-after; a signal to the ranks alone or
    Ctrl-C that leaves the script running does the same) exits 75: phase 2 must not start from an
    unfinished phase 1, whatever the launcher."""
    from tests.pretrain_helpers import env

    out = tmp_path / "run"
    cmd = [str(ROOT / "launch.sh"), "pretrain", "--np", "1", "--config1", str(ROOT / "ds_configs/cpu_seq128.json"),
           "--config2", str(ROOT / "ds_configs/cpu_seq512.json"), "--data-dir", str(pretrain_work / "data"),
           "--output-dir", str(out), "--max-steps", "4", "--train-batch-size", "8", "--micro-batch-size", "4",
           "--set", "pretrain.eval_samples=0", "--stop-after", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(env(), LAUNCH_DRY_RUN="0"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "phase 1 stopped before its last step" in proc.stderr
    assert (out / "phase1" / "checkpoints").is_dir() and not (out / "phase2").exists()
