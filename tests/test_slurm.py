"""SLURM scheduler: sbatch options, job scripts and jobs.json (fast), then a real single-node cluster (slow).

The slow tests start a throwaway slurmctld/slurmd/munged on 127.0.0.1 (``tests/slurm_cluster.py``);
they are skipped, with the reason printed, where Debian's SLURM packages are missing and cannot be
installed (installation is attempted as root when ``CI`` or ``WSSS_SLURM_INSTALL=1`` is set).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import pytest

from pipelines.slurm import (JobSpec, SbatchOptions, SlurmError, cancel_jobs, job_states, load_jobs, parse_scontrol,
                             query_job, record_jobs, render_script, sbatch, submit_jobs, summarize)
from stage1_cam.utils.run_dir import RunDir
from tests.slurm_cluster import SlurmCluster, slurm_cluster

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, name: str = "r1") -> RunDir:
    run = RunDir(tmp_path / "runs" / "synthetic" / name)
    run.path.mkdir(parents=True)
    return run


def _directives(script: str) -> list:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


# --------------------------------------------------------------------------------------------------
# fast unit tests
# --------------------------------------------------------------------------------------------------

def test_options_from_env_build_sbatch_arguments():
    env = {"SLURM_PARTITION": "gpu", "SLURM_CPUS": "8", "SLURM_MEM": "32G", "SLURM_TIME": "12:00:00",
           "SBATCH_EXTRA": "--account=abc --comment='two words'"}
    opts = SbatchOptions.from_env(gpus=4, env=env)
    assert opts.directives(gpus=opts.job_gpus("train")) == [
        "--partition=gpu", "--gres=gpu:4", "--cpus-per-task=8", "--mem=32G", "--time=12:00:00"]
    assert opts.extra == ("--account=abc", "--comment=two words")
    # one GPU per dump task, none for the CPU-only stages
    assert opts.job_gpus("dump") == 1 and opts.job_gpus("pseudo-labels") == 0 and opts.job_gpus("report") == 0
    assert "--gres=gpu:1" in opts.directives(gpus=opts.job_gpus("dump"))
    assert not any(d.startswith("--gres") for d in opts.directives(gpus=opts.job_gpus("report")))


def test_options_gpu_overrides_and_cpu_clusters():
    assert SbatchOptions.from_env(gpus=1, env={"SLURM_GPUS_PER_JOB": "2"}).job_gpus("retrain") == 2
    typed = SbatchOptions.from_env(gpus=2, env={"SLURM_GRES": "gpu:a100"})
    assert typed.directives(gpus=typed.job_gpus("train")) == ["--gres=gpu:a100:2"]
    for env, gpus in (({"SLURM_GRES": "none"}, 2), ({}, 0), ({"SLURM_GPUS_PER_JOB": "0"}, 3)):
        opts = SbatchOptions.from_env(gpus=gpus, env=env)
        for stage in ("train", "dump", "pseudo-labels", "retrain", "report"):
            assert opts.directives(gpus=opts.job_gpus(stage)) == [], (env, stage)
    assert SbatchOptions.from_env(gpus=1, env={}).directives(gpus=0) == []  # cluster defaults otherwise


@pytest.mark.parametrize("env, name", [
    ({"SLURM_GPUS_PER_JOB": "two"}, "SLURM_GPUS_PER_JOB"), ({"SLURM_GPUS_PER_JOB": "-1"}, "SLURM_GPUS_PER_JOB"),
    ({"SLURM_CPUS": "0"}, "SLURM_CPUS"), ({"SLURM_PARTITION": "a b"}, "SLURM_PARTITION"),
    ({"SBATCH_EXTRA": "--comment='unbalanced"}, "SBATCH_EXTRA"),
])
def test_options_reject_bad_values(env, name):
    with pytest.raises(ValueError, match=name):
        SbatchOptions.from_env(gpus=1, env=env)


def test_render_job_script(tmp_path):
    run = _run(tmp_path)
    opts = SbatchOptions.from_env(gpus=2, env={"SLURM_PARTITION": "p1", "SLURM_TIME": "1:00:00"})
    spec = JobSpec(stage="train", template="job.sbatch", values={"command": "echo 'a b' \"$HOME\""},
                   description="training")
    text = render_script(spec, run=run, options=opts, workdir=tmp_path)
    assert text.startswith("#!/bin/bash\n# training\n")
    log = run.path.resolve() / "slurm" / "logs" / "train-%j.out"
    assert _directives(text) == ["--job-name=wsss-synthetic-r1-train", f"--output={log}", f"--chdir={tmp_path}",
                                 "--open-mode=append", "--partition=p1", "--gres=gpu:2", "--time=1:00:00"]
    assert "exec echo 'a b' \"$HOME\"\n" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_rendered_dump_script_runs_its_shard(tmp_path):
    """The array script, run by bash as SLURM would, calls the dump with the task's shard."""
    run = _run(tmp_path)
    stub = tmp_path / "fake python"
    stub.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$OUT\"\n")
    stub.chmod(0o755)
    spec = JobSpec(stage="dump", template="dump.sbatch", array="0-3", requeue=True, description="dump",
                   values={"config": "'runs/x y/config.py'", "checkpoint": "ck.pth", "num_shards": "4",
                           "last_shard": "3"})
    text = render_script(spec, run=run, options=SbatchOptions(), workdir=tmp_path, python=str(stub))
    directives = _directives(text)
    assert "--array=0-3" in directives and "--requeue" in directives
    assert f"--output={run.path.resolve() / 'slurm' / 'logs' / 'dump-%A_%a.out'}" in directives
    script = tmp_path / "dump.sbatch"
    script.write_text(text)
    out = tmp_path / "argv.txt"
    env = {**os.environ, "OUT": str(out), "SLURM_ARRAY_TASK_ID": "2"}
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert out.read_text().splitlines() == ["-m", "stage1_cam.dump", "runs/x y/config.py", "--checkpoint",
                                            "ck.pth", "--shard", "2", "--num-shards", "4"]
    env.pop("SLURM_ARRAY_TASK_ID")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "--array=0-3" in r.stderr


def test_custom_template_dir_and_missing_placeholder(tmp_path, monkeypatch):
    from pipelines.slurm import template_dir

    run = _run(tmp_path)
    custom = tmp_path / "templates"
    custom.mkdir()
    (custom / "job.sbatch").write_text("#!/bin/bash\n${directives}\nmodule load cuda\n${command} ${nope}\n")
    monkeypatch.setenv("SLURM_TEMPLATE_DIR", str(custom))
    assert template_dir() == custom
    spec = JobSpec(stage="report", template="job.sbatch", values={"command": "true"}, description="r")
    with pytest.raises(KeyError, match="nope"):
        render_script(spec, run=run, options=SbatchOptions(), workdir=tmp_path, templates=template_dir())
    monkeypatch.setenv("SLURM_TEMPLATE_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SLURM_TEMPLATE_DIR"):
        template_dir()


def test_jobs_json_round_trip(tmp_path):
    path = tmp_path / "slurm" / "jobs.json"
    assert load_jobs(path) == {}
    record_jobs(path, {"report": {"job_id": "9", "script": "r.sbatch"}})
    record_jobs(path, {"train": {"job_id": "7", "script": "t.sbatch"}, "dump": {"job_id": "8", "array": "0-3"}})
    record_jobs(path, {"report": {"job_id": "10", "script": "r.sbatch"}})  # a resubmission replaces the record
    jobs = load_jobs(path)
    assert list(jobs) == ["train", "dump", "report"]  # pipeline order
    assert jobs["report"]["job_id"] == "10" and jobs["dump"]["array"] == "0-3"
    assert json.loads(path.read_text())["jobs"] == jobs
    path.write_text("{not json")
    with pytest.raises(ValueError, match="jobs.json"):
        load_jobs(path)


def test_parse_scontrol_counts_array_tasks():
    text = ("JobId=12 ArrayJobId=11 ArrayTaskId=0 JobName=wsss-dump UserId=root(0) JobState=COMPLETED Reason=None\n"
            "JobId=13 ArrayJobId=11 ArrayTaskId=1 JobName=wsss-dump JobState=RUNNING Reason=None\n"
            "JobId=11 ArrayJobId=11 ArrayTaskId=2-5,7 ArrayTaskThrottle=0 JobState=PENDING Reason=Resources\n")
    counts = parse_scontrol(text)
    assert counts == {"COMPLETED": 1, "RUNNING": 1, "PENDING": 5}
    assert summarize(counts) == "PENDING 5/7, COMPLETED 1/7, RUNNING 1/7"
    assert summarize(parse_scontrol("JobId=3 JobName=x JobState=COMPLETED Reason=None")) == "COMPLETED"
    assert summarize({}) == "UNKNOWN"


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match="slurm-client"):
        sbatch(tmp_path / "x.sbatch")


def test_status_without_slurm_reports_unknown(tmp_path, monkeypatch):
    """`make status` on a machine without SLURM commands still lists the recorded jobs."""
    path = tmp_path / "jobs.json"
    record_jobs(path, {"train": {"job_id": "41"}, "dump": {"job_id": "42", "array": "0-3"}})
    monkeypatch.setenv("PATH", str(tmp_path))
    states = job_states(path)
    assert list(states) == ["train", "dump"] and states["dump"][0] == "42"
    assert all(state.startswith("UNKNOWN (") and "slurm-client" in state for _, state in states.values())


def test_retrain_without_pseudo_masks_or_queued_job_is_an_error(tmp_path, monkeypatch):
    from pipelines.slurm import submit_retrain
    from pipelines.stages import StageError
    from stage1_cam.config import load_config

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: nothing may be submitted
    cfg = load_config(REPO / "configs" / "stage1" / "weclip_tiny-clip_synthetic-160x160_300i.py",
                      {"run.root": str(tmp_path / "runs"), "run.name": "r1"})
    run = RunDir.from_config(cfg)
    with pytest.raises(StageError, match="make pseudo-labels"):
        submit_retrain(cfg, run, "configs/stage2/x.py", gpus=1)


def _fake_slurm(bin_dir: Path, *, state: str = "RUNNING") -> Path:
    """``sbatch`` (prints job ids 101, 102, ... and logs its arguments) and ``scontrol`` (every job ``state``)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "sbatch.log"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho $((100 + $(wc -l < {log})))\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"JobId=$4 JobState={state}\"\n")
    for name in ("sbatch", "scontrol"):
        (bin_dir / name).chmod(0o755)
    return log


def test_retrain_submits_while_a_job_of_the_run_holds_the_run_lock(tmp_path, monkeypatch):
    """`make pseudo-labels retrain SCHEDULER=slurm`: the training job may start (and take run.lock) before the
    retrain submitter runs; the submitter must still queue its job after the pseudo-labels job."""
    import pipelines.__main__ as cli
    from stage1_cam.config import load_config
    from stage1_cam.utils.run_dir import RunLockedError

    log = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("WSSS_RUN_LOCK", raising=False)
    config = REPO / "configs" / "stage1" / "weclip_tiny-clip_synthetic-160x160_300i.py"
    cfg = load_config(config, {"run.root": str(tmp_path / "runs"), "run.name": "r1"})
    run = RunDir.from_config(cfg)
    run.prepare(cfg)
    run.unlock()
    record_jobs(run.path / "slurm" / "jobs.json", {"pseudo-labels": {"job_id": "13", "log": "x.out"}})
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the running training job
    try:
        import socket

        run.lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": job.pid, "slurm_job_id": "11",
                                             "token": "job-token"}))
        with pytest.raises(RunLockedError, match="SLURM job 11"):  # a local command is refused ...
            RunDir(run.path).lock()
        argv = ["retrain", "--config", str(config), "--run", "r1", "--scheduler", "slurm", "--model", "default",
                "--cfg-options", f"run.root={tmp_path / 'runs'}"]
        assert cli.main(argv) == 0  # ... the submitter is not
    finally:
        job.kill()
        job.wait()
    assert log.read_text().splitlines() == [
        f"--parsable --dependency=afterok:13 --kill-on-invalid-dep=yes {run.path / 'slurm' / 'retrain.sbatch'}"]
    assert load_jobs(run.path / "slurm" / "jobs.json")["retrain"]["dependency"] == ["13"]
    assert not (run.path / "slurm" / "submit.lock").exists()  # released


def test_concurrent_submitters_of_a_run_are_refused(tmp_path, monkeypatch):
    from pipelines.slurm import SubmitLock

    run = _run(tmp_path)
    with SubmitLock(run):
        with pytest.raises(SlurmError, match="another `make ... SCHEDULER=slurm` is submitting"):
            SubmitLock(run).acquire()
    SubmitLock(run).acquire()  # free again


# --------------------------------------------------------------------------------------------------
# a real single-node cluster
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    with slurm_cluster() as c:
        yield c


def _wait(predicate: Callable[[], bool], timeout: float, what: str, cluster: Optional[SlurmCluster] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    logs = cluster.logs() if cluster is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _states(run: RunDir) -> Dict[str, str]:
    return {k: v[1] for k, v in job_states(run.path / "slurm" / "jobs.json").items()}


STANDIN_DUMP = """#!/bin/bash
# stand-in for dump.sbatch: writes shard-<i>.txt; on its first run, task 1 waits to be requeued
${directives}
set -euo pipefail
cd ${workdir}
SHARD=$$SLURM_ARRAY_TASK_ID
echo "shard $$SHARD restart $${SLURM_RESTART_COUNT:-0}"
test -f "${run_dir}/trained.txt"
if [ "$$SHARD" = 1 ] && [ "$${SLURM_RESTART_COUNT:-0}" = 0 ]; then touch "${run_dir}/shard-1.started"; sleep 300; fi
echo "$$SHARD" > "${run_dir}/shard-$$SHARD.txt"
"""


@pytest.mark.slow
def test_dependencies_array_requeue_and_cancel_on_cluster(cluster, tmp_path, monkeypatch):
    """Job mechanics with stand-in commands: afterok chain, array tasks, a requeued task, cancel, failure."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "pipelines" / "templates", templates)
    (templates / "dump.sbatch").write_text(STANDIN_DUMP)
    monkeypatch.setenv("SLURM_TEMPLATE_DIR", str(templates))
    run = _run(tmp_path / "with space")  # paths with spaces survive the #SBATCH lines and the commands
    rd = run.path.resolve()
    opts = SbatchOptions.from_env(gpus=1, env={"SLURM_GRES": "none", "SLURM_CPUS": "1"})
    train_cmd = shlex.join(["bash", "-c", "sleep 2; date > " + shlex.quote(str(rd / "trained.txt"))])
    finalise_cmd = shlex.join(["bash", "-c", "cd " + shlex.quote(str(rd)) + " && cat shard-?.txt > manifest.txt"])
    specs = [
        (JobSpec(stage="train", template="job.sbatch", description="stand-in training",
                 values={"command": train_cmd}), ()),
        (JobSpec(stage="dump", template="dump.sbatch", description="stand-in dump", array="0-3", requeue=True,
                 values={}), ("train",)),
        (JobSpec(stage="pseudo-labels", template="job.sbatch", description="stand-in finalise",
                 values={"command": finalise_cmd}), ("train", "dump")),
    ]
    ids = submit_jobs(specs, run=run, options=opts)
    assert list(ids) == ["train", "dump", "pseudo-labels"]
    jobs = load_jobs(run.path / "slurm" / "jobs.json")
    assert jobs["dump"]["dependency"] == [ids["train"]] and jobs["pseudo-labels"]["dependency"] == [
        ids["train"], ids["dump"]]
    assert _states(run)["pseudo-labels"] == "PENDING"

    # task 1 hangs on its first run: requeue it once it has started, as an admin or a preemption would
    _wait(lambda: (rd / "shard-1.started").is_file(), 90, "dump task 1 to start", cluster)
    _wait(lambda: all((rd / f"shard-{i}.txt").is_file() for i in (0, 2, 3)), 90, "the other dump tasks", cluster)
    assert "RUNNING" in _states(run)["dump"] and _states(run)["pseudo-labels"] == "PENDING"
    cluster.requeue(f"{ids['dump']}_1")
    _wait(lambda: _states(run)["pseudo-labels"] == "COMPLETED", 120, "the finalise job", cluster)
    assert _states(run) == {"train": "COMPLETED", "dump": "COMPLETED", "pseudo-labels": "COMPLETED"}
    assert (rd / "manifest.txt").read_text().split() == ["0", "1", "2", "3"]
    log1 = rd / "slurm" / "logs" / f"dump-{ids['dump']}_1.out"
    assert "shard 1 restart 0" in log1.read_text() and "shard 1 restart 1" in log1.read_text()  # appended

    # a failing job: its dependent is cancelled by SLURM instead of waiting forever
    fail = submit_jobs([
        (JobSpec(stage="retrain", template="job.sbatch", description="fails", values={"command": "false"}), ()),
        (JobSpec(stage="report", template="job.sbatch", description="never runs", values={"command": "true"}),
         ("retrain",))], run=run, options=opts)
    _wait(lambda: _states(run)["report"] not in ("PENDING", "RUNNING"), 60, "the failed dependency", cluster)
    assert _states(run)["retrain"] == "FAILED" and _states(run)["report"] == "CANCELLED"
    assert query_job(fail["report"]) == {"CANCELLED": 1}

    # make cancel: pending and running jobs of the run are cancelled, finished ones left alone
    ids = submit_jobs([
        (JobSpec(stage="retrain", template="job.sbatch", description="long", values={"command": "sleep 300"}), ()),
        (JobSpec(stage="report", template="job.sbatch", description="after", values={"command": "true"}),
         ("retrain",))], run=run, options=opts)
    _wait(lambda: _states(run)["retrain"] == "RUNNING", 60, "the long job to start", cluster)
    assert sorted(cancel_jobs(run.path / "slurm" / "jobs.json")) == sorted(ids.values())
    _wait(lambda: _states(run)["retrain"] == "CANCELLED" and _states(run)["report"] == "CANCELLED", 60,
          "cancellation", cluster)
    assert cancel_jobs(run.path / "slurm" / "jobs.json") == []


# --------------------------------------------------------------------------------------------------
# end to end: `make pseudo-labels retrain report SCHEDULER=slurm` against a local run of the same config
# --------------------------------------------------------------------------------------------------

# Small enough for a few minutes on 2 CPUs; one image per dump batch so a shard takes long enough to be
# interrupted half-way. dump.batch_size and dump.crf.workers do not change outputs (outside the hash).
TRAIN_IMAGES, SHARDS = 32, 2  # 16 images per shard (ids dealt round-robin)
# dump.flush_every=1: each image is durable when written, so a shard is seen part-way (the requeue test needs it).
TINY_OPTIONS = (f"data.synthetic.num_train={TRAIN_IMAGES} data.synthetic.num_val=4 train.max_iters=4 "
                f"train.val_interval=0 train.ckpt_interval=4 dump.num_shards={SHARDS} dump.batch_size=1 "
                f"dump.crf.workers=1 dump.flush_every=1")
PER_SHARD = TRAIN_IMAGES // SHARDS
TINY_STAGE2 = """# stage-2 smoke config shrunk to a few iterations for tests/test_slurm.py
_base_ = [{base!r}]
train_cfg = dict(max_iters=4, val_interval=4)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=4, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
"""
E2E_TIMEOUT_S = 1500


def _make(targets, *, env: Dict[str, str], timeout: float, **variables: str) -> subprocess.CompletedProcess:
    """``make <targets> VAR=value ...`` in the repository, with this interpreter's venv.

    ``-o <stamp>``: the environment is already installed (this interpreter), so ``make setup`` is not re-run.
    """
    venv = Path(sys.prefix)
    cmd = ["make", "--no-print-directory", "-o", f"{venv}/.wsss-installed", *targets, f"VENV={venv}",
           *(f"{k}={v}" for k, v in variables.items())]
    dry = subprocess.run([*cmd[:2], "-n", *cmd[2:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "setup_env" not in dry.stdout, f"make would re-run the installation:\n{dry.stdout}"
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _job_logs(run_path: Path) -> str:
    out = []
    for p in sorted((run_path / "slurm" / "logs").glob("*.out")):
        out.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(out)


def _complete_images(partial: Path) -> int:
    """Images marked complete in a shard's partial file (-1 if it cannot be read right now)."""
    import h5py

    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(1 for g in f["images"].values() if g.attrs.get("complete"))
    except (OSError, KeyError):
        return -1


def _interrupt_mid_shard(cluster: SlurmCluster, shard_dir: Path, array_id: str, task: int, num_shards: int, total: int,
                         timeout: float) -> int:
    """Requeue dump task ``task`` once its shard holds some but not all images; returns how many it held.

    The writer's pid comes from the shard's lock file; it is paused (SIGSTOP) while the partial file is
    inspected, so the requeue hits it with the shard neither empty nor finished.
    """
    import signal

    name = f"shard-{task:05d}-of-{num_shards:05d}.h5"
    lock, partial = shard_dir / f"{name}.lock", shard_dir / f"{name}.partial"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (shard_dir / name).exists():
            raise AssertionError(f"shard {task} finished before it could be interrupted; make the dump slower")
        try:
            pid = int(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
            continue
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            time.sleep(0.05)
            continue
        requeued = False
        try:
            n = _complete_images(partial) if partial.exists() else 0
            if 0 < n < total:
                cluster.run("scontrol", "requeue", f"{array_id}_{task}")
                requeued = True
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if requeued:
            cluster.start_now(f"{array_id}_{task}")
            return n
        time.sleep(0.05)
    raise AssertionError(f"dump task {task} never had a partial shard within {timeout:.0f} s\n{cluster.logs()}")


@pytest.fixture(scope="module")
def e2e(cluster: SlurmCluster, tmp_path_factory) -> Dict[str, object]:
    """Run the pipeline on SLURM (interrupting one dump task half-way) and stage 1 locally; return the run dirs."""
    from pipelines.stages import stage2_config

    tmp = tmp_path_factory.mktemp("e2e")
    model = tmp / "stage2_tiny.py"
    model.write_text(TINY_STAGE2.format(base=str(REPO / stage2_config("synthetic", None))))
    env = {**cluster.env, "WSSS_DATA_ROOT": str(tmp / "data"), "SLURM_GRES": "none", "SLURM_CPUS": "1"}
    for var in ("SLURM_PARTITION", "SLURM_GPUS_PER_JOB", "SLURM_MEM", "SLURM_TIME", "SBATCH_EXTRA",
                "SLURM_TEMPLATE_DIR"):
        env.pop(var, None)
    options = f"run.root={tmp / 'runs'} {TINY_OPTIONS}"
    common = dict(DATASET="synthetic", OPTIONS=options, MODEL=str(model))
    slurm_run = tmp / "runs" / "synthetic" / "slurm-test"
    local_run = tmp / "runs" / "synthetic" / "local-test"
    t0 = time.monotonic()

    r = _make(["pseudo-labels", "retrain", "report"], env=env, timeout=300, SCHEDULER="slurm", RUN="slurm-test",
              **common)
    assert r.returncode == 0, f"make (slurm) failed:\n{r.stdout}\n{r.stderr}"
    jobs = load_jobs(slurm_run / "slurm" / "jobs.json")
    assert list(jobs) == ["train", "dump", "pseudo-labels", "retrain", "report"], (jobs, r.stderr)

    # interrupt dump task 1 half-way through its shard; SLURM requeues it and it must resume the shard
    held = _interrupt_mid_shard(cluster, slurm_run / "pseudo_masks", jobs["dump"]["job_id"], task=1,
                                num_shards=SHARDS, total=PER_SHARD, timeout=600)

    def finished() -> bool:
        states = _states(RunDir(slurm_run))
        return not any(s.split()[0] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
                       for s in states.values())

    _wait(finished, E2E_TIMEOUT_S - (time.monotonic() - t0), "the SLURM jobs", cluster)
    states = _states(RunDir(slurm_run))
    assert all(s == "COMPLETED" for s in states.values()), f"{states}\n{_job_logs(slurm_run)}"
    restarts = cluster.run("scontrol", "-o", "show", "job", f"{jobs['dump']['job_id']}_1").stdout

    # the reference: the same stage-1 config run locally (stage 2 and the report are not compared)
    r = _make(["pseudo-labels"], env=env, timeout=E2E_TIMEOUT_S, SCHEDULER="local", RUN="local-test", **common)
    assert r.returncode == 0, f"make (local) failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return {"slurm": slurm_run, "local": local_run, "jobs": jobs, "held": held, "restarts": restarts, "env": env,
            "common": common}


def _comparable(path: Path) -> dict:
    """A JSON output (manifest.json, metrics.json) without what legitimately differs between two runs.

    Dropped: file checksums, sizes and times of the HDF5 shards (a resumed shard holds the same data in a
    differently laid out file; the masks are compared one by one instead), the checkpoint file's hash (the
    checkpoint embeds its run's name and directory), the shard directory, the git SHA, and when and from
    which shard files (by sha256) metrics were computed.
    """
    drop = {"git_sha", "checkpoint_hash", "size", "mtime_ns", "sha256", "shard_dir", "computed_at", "inputs"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads(path.read_text()))


@pytest.mark.slow
def test_slurm_pipeline_equals_local_run(e2e):
    import numpy as np

    from stage1_cam.io.shards import ShardReader

    slurm_dir, local_dir = e2e["slurm"] / "pseudo_masks", e2e["local"] / "pseudo_masks"
    assert _comparable(slurm_dir / "manifest.json") == _comparable(local_dir / "manifest.json")
    with ShardReader(slurm_dir) as a, ShardReader(local_dir) as b:
        assert list(a.ids) == list(b.ids) and len(a.ids) == TRAIN_IMAGES
        for name in a.ids:
            np.testing.assert_array_equal(a.label(name), b.label(name), err_msg=name)
            np.testing.assert_array_equal(a.confidence(name), b.confidence(name), err_msg=name)
            np.testing.assert_array_equal(a.image_labels(name), b.image_labels(name), err_msg=name)
    assert _comparable(slurm_dir / "metrics.json") == _comparable(local_dir / "metrics.json")
    # the retrain and report jobs produced their outputs
    run = e2e["slurm"]
    assert (run / "stage2" / "metrics.json").is_file(), f"{run}: no stage-2 metrics"
    assert (run / "report" / "index.html").is_file() and (run / "report" / "metrics.json").is_file()
    # every job ran the local code path from a generated script, with its log kept under <run>/slurm/
    for stage, rec in e2e["jobs"].items():
        assert Path(rec["script"]).is_file(), stage
        logs = list((e2e["slurm"] / "slurm" / "logs").glob(f"{stage}-{rec['job_id']}*.out"))
        assert logs, f"no log for {stage}"


@pytest.mark.slow
def test_requeued_dump_task_resumes_its_shard(e2e):
    """The dump task interrupted half-way was requeued by SLURM and finished the shard from its partial file."""
    jobs = e2e["jobs"]
    assert "Restarts=1" in e2e["restarts"]
    log = (e2e["slurm"] / "slurm" / "logs" / f"dump-{jobs['dump']['job_id']}_1.out").read_text()
    assert "restart 0" in log and "restart 1" in log  # both runs appended to the task's log
    # The task runs on between the SIGCONT and SLURM's kill, so it may finish more images than it held when
    # the requeue was sent (2 where 1 was held, in one CI run); the restart resumes from what the file holds.
    held = e2e["held"]
    resumed = [int(n) for n in re.findall(r"resuming \S+shard-00001-of-\d+\.h5\.partial: (\d+) images complete",
                                          log)]
    assert len(resumed) == 1 and held <= resumed[0] < PER_SHARD, (held, resumed, log[-3000:])
    assert f"shard 1/{SHARDS}: {PER_SHARD - resumed[0]} images written" in log, log[-3000:]
    shard = e2e["slurm"] / "pseudo_masks" / f"shard-00001-of-{SHARDS:05d}.h5"
    assert shard.is_file() and not shard.with_name(shard.name + ".partial").exists()
    assert not shard.with_name(shard.name + ".lock").exists()


@pytest.mark.slow
def test_status_and_rerun_after_slurm_run(e2e):
    """`make status` lists the run's jobs; re-running the targets with everything done submits nothing."""
    env, common = e2e["env"], e2e["common"]
    before = load_jobs(e2e["slurm"] / "slurm" / "jobs.json")
    r = _make(["status"], env=env, timeout=120, SCHEDULER="slurm", RUN="slurm-test", **common)
    assert r.returncode == 0, r.stderr
    for stage, rec in before.items():
        assert f"slurm {stage}: job {rec['job_id']} COMPLETED" in r.stdout, r.stdout
    r = _make(["pseudo-labels", "retrain"], env=env, timeout=300, SCHEDULER="slurm", RUN="slurm-test", **common)
    assert r.returncode == 0, r.stderr
    assert load_jobs(e2e["slurm"] / "slurm" / "jobs.json") == before  # nothing resubmitted
