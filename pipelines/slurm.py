"""SLURM scheduler: the pipeline's stages as dependent batch jobs running the local code paths.

``make pseudo-labels SCHEDULER=slurm`` submits

    train (python -m stage1_cam.train <run>/config.py)
      └─ afterok ─► dump, an array job with one requeue-safe task per shard
                      └─ afterok ─► pseudo-labels (python -m pipelines pseudo-labels --scheduler local:
                                     skips finished stages, writes the manifest and the mask metrics)

A training-free run (``head.type="none"``) has no train job: the dump array (``training_free.sbatch``) writes
the training-free masks shard by shard, then the pseudo-labels job.

``make retrain`` submits one job (``python -m pipelines retrain --scheduler local``) that depends on the
pseudo-labels job while that is pending or running, and ``make report`` one that depends on the retrain
(or pseudo-labels) job likewise. Each job runs the same ``--scheduler local`` code path, from the
submitting directory (``--chdir``) with the submitting interpreter (``sys.executable``).

Scripts are rendered from ``pipelines/templates/*.sbatch`` (``string.Template``; a directory of
replacements can be given in ``SLURM_TEMPLATE_DIR``) into ``<run>/slurm/``, logs go to
``<run>/slurm/logs/`` and submissions are recorded in ``<run>/slurm/jobs.json`` (stage name -> job id,
script, log), which ``make status`` and ``make cancel`` read.

Resources come from environment (or Make) variables; nothing cluster-specific is hard-coded:

    SLURM_PARTITION     --partition (default: the cluster's default partition)
    SLURM_GPUS_PER_JOB  GPUs of the training and retraining jobs (default: --gpus / GPUS); dump tasks
                        get at most one, the pseudo-labels and report jobs none
    SLURM_GRES          generic resource name for GPUs (default ``gpu`` -> --gres=gpu:N; e.g.
                        ``gpu:a100``); ``none`` never requests GPUs (CPU clusters)
    SLURM_CPUS          --cpus-per-task
    SLURM_MEM           --mem (e.g. 32G)
    SLURM_TIME          --time (e.g. 12:00:00)
    SBATCH_EXTRA        extra sbatch arguments, split like a shell command line (e.g. "--account=abc
                        --qos=high"); they are given on the command line and so override the script's
                        ``#SBATCH`` lines
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from stage1_cam.heads import is_training_free
from stage1_cam.utils.cli import BadInputError, UnknownNameError
from stage1_cam.utils.files import atomic_write_text
from stage1_cam.utils.locks import FileLock
from stage1_cam.utils.run_dir import RunDir

from .stages import Paths, StageError, manifest_complete, needs_initial_cams, python_cmd, run_cmd

_logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

# Stage names (keys of jobs.json), in pipeline order.
STAGES = ("cams", "train", "dump", "pseudo-labels", "retrain", "report")

# Job states in which a job may still run (so dependents must wait for it).
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
    "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
UNKNOWN = "UNKNOWN"


class SlurmError(StageError):
    """A SLURM command failed or SLURM is not available; the message has the command's output."""


# --------------------------------------------------------------------------------------------------
# sbatch options
# --------------------------------------------------------------------------------------------------

def _env_int(env: Mapping[str, str], name: str, *, minimum: int) -> Optional[int]:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise BadInputError(f"{name}={raw!r} must be an integer >= {minimum} (unset it to use the default)")
    return value


def _check_value(name: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise BadInputError(f"{name}={value!r} must be a single non-empty word without spaces")
    return value


@dataclass(frozen=True)
class SbatchOptions:
    """Resources requested for every job of a run; see the module docstring for the variables.

    Attributes:
        partition: ``--partition``; None uses the cluster's default partition.
        gpus: GPUs for the multi-GPU stages (training, retraining).
        gres: generic resource name requested as ``--gres=<gres>:<n>``; None never requests GPUs.
        cpus: ``--cpus-per-task``; None uses the cluster default.
        mem: ``--mem``; None uses the cluster default.
        time: ``--time``; None uses the partition's default limit.
        extra: extra sbatch arguments, placed on the sbatch command line.
    """

    partition: Optional[str] = None
    gpus: int = 0
    gres: Optional[str] = "gpu"
    cpus: Optional[int] = None
    mem: Optional[str] = None
    time: Optional[str] = None
    extra: Tuple[str, ...] = ()

    @classmethod
    def from_env(cls, *, gpus: int, env: Optional[Mapping[str, str]] = None) -> "SbatchOptions":
        """Read the options from ``env`` (default ``os.environ``); ``gpus`` is the default GPU count.

        Raises:
            ValueError: a variable has an invalid value (the message names it).
        """
        env = os.environ if env is None else env
        if gpus < 0:
            raise BadInputError(f"--gpus/GPUS={gpus} must be >= 0")
        per_job = _env_int(env, "SLURM_GPUS_PER_JOB", minimum=0)
        gres = env.get("SLURM_GRES", "").strip() or "gpu"
        partition = env.get("SLURM_PARTITION", "").strip() or None
        mem = env.get("SLURM_MEM", "").strip() or None
        time = env.get("SLURM_TIME", "").strip() or None
        try:
            extra = tuple(shlex.split(env.get("SBATCH_EXTRA", "")))
        except ValueError as e:
            raise BadInputError(f"SBATCH_EXTRA={env.get('SBATCH_EXTRA')!r} is not a valid argument list ({e}); "
                                f"quote it like a shell command line") from e
        for name, value in (("SLURM_PARTITION", partition), ("SLURM_GRES", gres), ("SLURM_MEM", mem),
                            ("SLURM_TIME", time)):
            if value is not None:
                _check_value(name, value)
        return cls(partition=partition, gpus=gpus if per_job is None else per_job,
                   gres=None if gres.lower() == "none" else gres, cpus=_env_int(env, "SLURM_CPUS", minimum=1),
                   mem=mem, time=time, extra=extra)

    def directives(self, *, gpus: int) -> List[str]:
        """Resource arguments for a job that uses ``gpus`` GPUs (``--gres`` only when > 0 and gres set)."""
        args = []
        if self.partition:
            args.append(f"--partition={self.partition}")
        if gpus > 0 and self.gres:
            args.append(f"--gres={self.gres}:{gpus}")
        if self.cpus:
            args.append(f"--cpus-per-task={self.cpus}")
        if self.mem:
            args.append(f"--mem={self.mem}")
        if self.time:
            args.append(f"--time={self.time}")
        return args

    def job_gpus(self, stage: str) -> int:
        """GPUs a stage's job uses: all for train/retrain, at most one per dump task or CAM job, none otherwise."""
        if self.gres is None:
            return 0
        if stage in ("train", "retrain"):
            return self.gpus
        if stage in ("dump", "cams"):
            return min(self.gpus, 1)
        return 0


# --------------------------------------------------------------------------------------------------
# job scripts
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobSpec:
    """One batch job of a run.

    Attributes:
        stage: key in jobs.json (one of :data:`STAGES`).
        template: template file name under the template directory.
        values: template values besides the common ones (e.g. ``command``), unquoted shell text.
        description: one line written at the top of the script.
        array: ``--array`` range (e.g. ``0-3``) or None.
        requeue: submit with ``--requeue`` (the job must be safe to restart).
    """

    stage: str
    template: str
    values: Mapping[str, str]
    description: str
    array: Optional[str] = None
    requeue: bool = False


def template_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """``SLURM_TEMPLATE_DIR`` when set (must exist), else the package's templates."""
    env = os.environ if env is None else env
    custom = env.get("SLURM_TEMPLATE_DIR", "").strip()
    if not custom:
        return TEMPLATE_DIR
    path = Path(custom)
    if not path.is_dir():
        raise FileNotFoundError(f"SLURM_TEMPLATE_DIR={custom} is not a directory; copy {TEMPLATE_DIR} and edit it")
    return path


def render_script(spec: JobSpec, *, run: RunDir, options: SbatchOptions, workdir: Path,
                  templates: Path = TEMPLATE_DIR, python: str = sys.executable) -> str:
    """Render a job script: ``#SBATCH`` directives (name, log, resources, array, requeue) + the template.

    Common placeholders: ``description``, ``run_dir``, ``workdir``, ``python`` (the interpreter that
    runs the stages, default the submitting one) and ``directives``; ``spec.values`` adds the rest.

    Raises:
        FileNotFoundError: the template does not exist.
        KeyError: the template uses a placeholder that is not provided (message names it).
    """
    path = templates / spec.template
    if not path.is_file():
        raise FileNotFoundError(f"job script template {path} not found (templates: {TEMPLATE_DIR})")
    run_abs = run.path.resolve()
    log_name = f"{spec.stage}-%A_%a.out" if spec.array else f"{spec.stage}-%j.out"
    directives = [f"--job-name={job_name(run, spec.stage)}", f"--output={run_abs / 'slurm' / 'logs' / log_name}",
                  f"--chdir={workdir}", "--open-mode=append", *options.directives(gpus=options.job_gpus(spec.stage))]
    if spec.array:
        directives.append(f"--array={spec.array}")
    if spec.requeue:
        directives.append("--requeue")
    values = {"description": spec.description, "run_dir": str(run_abs), "workdir": shlex.quote(str(workdir)),
              "python": shlex.quote(python),
              "directives": "\n".join(f"#SBATCH {shlex.quote(d)}" for d in directives), **spec.values}
    try:
        return Template(path.read_text()).substitute(values)
    except KeyError as e:
        raise UnknownNameError(f"template {path} uses ${{{e.args[0]}}}, which pipelines.slurm does not provide; "
                               f"available: {', '.join(sorted(values))}") from None
    except ValueError as e:
        raise BadInputError(f"template {path}: {e}; write a literal $ as $$") from None


def job_name(run: RunDir, stage: str) -> str:
    """``wsss-<dataset>-<run>-<stage>``, as shown by squeue."""
    return f"wsss-{run.path.parent.name}-{run.path.name}-{stage}"


# --------------------------------------------------------------------------------------------------
# jobs.json
# --------------------------------------------------------------------------------------------------

def jobs_file(run: RunDir) -> Path:
    return run.path / "slurm" / "jobs.json"


def load_jobs(path: Path) -> Dict[str, Dict[str, Any]]:
    """Stage name -> record (``job_id``, ``script``, ``log``, ``array``, ``dependency``, ``submitted``)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise BadInputError(f"{path} is not valid JSON ({e}); it is written by pipelines.slurm: move it away") from None
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, dict) or not all(isinstance(r, dict) and "job_id" in r for r in jobs.values()):
        raise BadInputError(f"{path} is not a jobs file written by pipelines.slurm (no 'jobs' mapping of stage "
                            f"records with a 'job_id'); move it away")
    return jobs


def record_jobs(path: Path, new: Mapping[str, Mapping[str, Any]]) -> None:
    """Add or replace stage records in ``path`` (atomically, keeping the other stages)."""
    jobs = load_jobs(path)
    jobs.update({k: dict(v) for k, v in new.items()})
    ordered = {k: jobs[k] for k in sorted(jobs, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))}
    atomic_write_text(path, json.dumps({"jobs": ordered}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# SLURM commands
# --------------------------------------------------------------------------------------------------

def _slurm_bin(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"`{name}` not found on PATH: SCHEDULER=slurm needs the SLURM client commands "
                         f"(Debian/Ubuntu package slurm-client) on the submitting machine")
    return path


def _slurm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [_slurm_bin(args[0]), *args[1:]]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s; is slurmctld up?") from None


def sbatch(script: Path, *, dependency: Sequence[str] = (), extra: Sequence[str] = ()) -> str:
    """Submit ``script`` (after ``afterok`` on ``dependency``); returns the job id.

    Dependent jobs are cancelled by SLURM if a dependency fails (``--kill-on-invalid-dep=yes``).
    """
    args = ["--parsable"]
    if dependency:
        args += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    r = _slurm("sbatch", *args, *extra, str(script))
    if r.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script} printed {r.stdout.strip()!r}, not a job id")
    return job_id


def _count_tasks(spec: str) -> int:
    """Number of tasks in an ArrayTaskId spec such as ``3``, ``1-3``, ``0-7:2%2`` or ``1,4-5``."""
    n = 0
    for part in spec.split("%")[0].split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if m is None:
            n += 1
            continue
        lo, hi, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
        n += (hi - lo) // step + 1
    return n


def parse_scontrol(text: str) -> Dict[str, int]:
    """Task counts per state from ``scontrol -o show job <id>`` (one record per line; array-aware)."""
    counts: Dict[str, int] = {}
    for line in text.splitlines():
        m = re.search(r"\bJobState=(\S+)", line)
        if m is None:
            continue
        task = re.search(r"\bArrayTaskId=(\S+)", line)
        n = _count_tasks(task.group(1)) if task else 1
        counts[m.group(1)] = counts.get(m.group(1), 0) + n
    return counts


def query_job(job_id: str) -> Dict[str, int]:
    """Task counts per state of a job (all tasks of an array job); ``{}`` when SLURM no longer knows it.

    Raises:
        SlurmError: scontrol is missing or the controller does not answer.
    """
    r = _slurm("scontrol", "-o", "show", "job", str(job_id))
    if r.returncode != 0:
        if "invalid job id" in (r.stderr + r.stdout).lower():
            return {}
        raise SlurmError(f"scontrol show job {job_id} failed (exit {r.returncode}): {r.stderr.strip()}")
    return parse_scontrol(r.stdout)


def summarize(counts: Mapping[str, int]) -> str:
    """``COMPLETED`` when all tasks share a state, else e.g. ``COMPLETED 2/4, RUNNING 1/4, PENDING 1/4``."""
    if not counts:
        return UNKNOWN
    if len(counts) == 1:
        return next(iter(counts))
    total = sum(counts.values())
    return ", ".join(f"{s} {n}/{total}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def is_active(counts: Mapping[str, int]) -> bool:
    return any(s in ACTIVE_STATES for s in counts)


def job_states(jobs_json: Path) -> Dict[str, Tuple[str, str]]:
    """Stage name -> (job id, state) for the jobs recorded in ``jobs_json`` (``{}`` if it is missing).

    The state is a summary over all tasks of an array job (see :func:`summarize`); ``UNKNOWN`` once
    slurmctld has forgotten the job (after MinJobAge), or ``UNKNOWN (<reason>)`` if SLURM cannot be asked.
    """
    out: Dict[str, Tuple[str, str]] = {}
    for stage, rec in load_jobs(Path(jobs_json)).items():
        try:
            state = summarize(query_job(rec["job_id"]))
        except SlurmError as e:
            _logger.warning("%s", e)
            state = f"{UNKNOWN} ({e})"
        out[stage] = (str(rec["job_id"]), state)
    return out


def cancel_jobs(jobs_json: Path) -> List[str]:
    """``scancel`` the recorded jobs that are still pending or running; returns their ids."""
    jobs = load_jobs(Path(jobs_json))
    if not jobs:
        _logger.info("no SLURM jobs recorded in %s: nothing to cancel", jobs_json)
        return []
    active = [str(rec["job_id"]) for rec in jobs.values() if is_active(query_job(rec["job_id"]))]
    if not active:
        _logger.info("none of the jobs in %s is pending or running", jobs_json)
        return []
    r = _slurm("scancel", *active)
    if r.returncode != 0:
        raise SlurmError(f"scancel {' '.join(active)} failed (exit {r.returncode}): {r.stderr.strip()}")
    _logger.info("cancelled jobs %s", " ".join(active))
    return active


# --------------------------------------------------------------------------------------------------
# submission
# --------------------------------------------------------------------------------------------------

def _states(jobs: Mapping[str, Mapping[str, Any]], stages: Sequence[str]) -> Dict[str, Dict[str, int]]:
    return {s: query_job(jobs[s]["job_id"]) for s in stages if s in jobs}


def submit_jobs(specs: Sequence[Tuple[JobSpec, Sequence[str]]], *, run: RunDir, options: SbatchOptions,
                env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Render and submit ``(spec, dependencies)`` in order, recording each in jobs.json as it goes.

    The caller holds the run's :class:`SubmitLock` (the ``submit_*`` functions take it).

    A dependency is the stage name of a job submitted earlier in ``specs`` (ignored when that stage was
    not submitted, e.g. training skipped) or a literal job id of an already queued job.
    """
    workdir = Path.cwd()
    templates = template_dir(env)
    slurm_dir = run.path / "slurm"
    (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    submitted: Dict[str, str] = {}
    for spec, deps in specs:
        script = slurm_dir / f"{spec.stage}.sbatch"
        script.write_text(render_script(spec, run=run, options=options, workdir=workdir, templates=templates))
        script.chmod(0o755)
        dep_ids = [submitted[d] for d in deps if d in submitted] + [d for d in deps if d.isdigit()]
        job_id = sbatch(script, dependency=dep_ids, extra=options.extra)
        submitted[spec.stage] = job_id
        log = slurm_dir / "logs" / (f"{spec.stage}-{job_id}_<task>.out" if spec.array else
                                    f"{spec.stage}-{job_id}.out")
        record_jobs(jobs_file(run), {spec.stage: {
            "job_id": job_id, "script": str(script), "log": str(log), "array": spec.array,
            "dependency": dep_ids, "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")}})
        _logger.info("submitted %s: job %s%s%s (script %s)", spec.stage, job_id,
                     f" array {spec.array}" if spec.array else "",
                     f" after {','.join(dep_ids)}" if dep_ids else "", script)
    return submitted


class SubmitLock(FileLock):
    """``<run>/slurm/submit.lock``: one submitter at a time queries and submits the jobs of a run.

    Not the run lock: the run's jobs take that themselves when they start, which may be before the
    submitter of a later stage (``make pseudo-labels retrain`` in one go) has finished.
    """

    kind, log = "submit lock", _logger

    def __init__(self, run: RunDir) -> None:
        (run.path / "slurm").mkdir(parents=True, exist_ok=True)
        super().__init__(run.path / "slurm" / "submit.lock", run, error=SlurmError,
                         holder_hint="another `make ... SCHEDULER=slurm` is submitting jobs of this run")


def _already_queued(run: RunDir, stages: Sequence[str]) -> Optional[str]:
    jobs = load_jobs(jobs_file(run))
    active = [f"{s} (job {jobs[s]['job_id']}: {summarize(c)})" for s, c in _states(jobs, stages).items()
              if is_active(c)]
    return ", ".join(active) or None


def _submit_pseudo_labels(cfg: Any, run: RunDir, *, gpus: int = 1, env: Optional[Mapping[str, str]] = None
                          ) -> Dict[str, str]:
    """See :func:`submit_pseudo_labels` (called with the submit lock held)."""
    queued = _already_queued(run, ("cams", "train", "dump", "pseudo-labels"))
    if queued:
        _logger.info("jobs of this run are still queued or running: %s; nothing submitted "
                     "(`make status`, `make cancel`)", queued)
        return {}
    paths = Paths(run)
    done_manifest = manifest_complete(paths, cfg)
    if done_manifest and paths.mask_metrics.is_file():
        _logger.info("%s and %s exist: nothing to submit", paths.manifest, paths.mask_metrics)
        return {}
    options = SbatchOptions.from_env(gpus=gpus, env=env)
    conf = str(run.config_file)
    run_cmd(python_cmd("stage1_cam.data", "--config", conf))
    from stage1_cam.train import trained_for

    training_free = is_training_free(cfg.head.type)
    trained = training_free or trained_for(run.final_ckpt, cfg)
    name = cfg.run.name
    specs: List[Tuple[JobSpec, Sequence[str]]] = []
    if training_free:
        _logger.info("head %r is training-free: no training job", cfg.head.type)
    elif trained:
        _logger.info("stage-1 checkpoint %s exists for this config: no training job", run.final_ckpt)
    else:
        if needs_initial_cams(cfg, run):  # heads that train on existing masks, by default the run's initial CAMs
            cmd = python_cmd("stage1_cam.cams", conf)
            specs.append((JobSpec(stage="cams", template="job.sbatch", values={"command": shlex.join(cmd)},
                                  description=f"initial CAMs the head trains on, for {run.path}"), ()))
        cmd = python_cmd("stage1_cam.train", conf, gpus=options.job_gpus("train"))
        specs.append((JobSpec(stage="train", template="job.sbatch", values={"command": shlex.join(cmd)},
                              description=f"stage-1 head training for {run.path}"), ("cams",)))
    if not done_manifest:
        n = int(cfg["dump"]["num_shards"])
        values = {"config": shlex.quote(conf), "num_shards": str(n), "last_shard": str(n - 1)}
        if training_free:
            spec = JobSpec(stage="dump", template="training_free.sbatch", values=values, array=f"0-{n - 1}",
                           requeue=True, description=f"training-free pseudo-masks, one task per shard, for {run.path}")
        else:
            spec = JobSpec(stage="dump", template="dump.sbatch", array=f"0-{n - 1}", requeue=True,
                           values={**values, "checkpoint": shlex.quote(str(run.final_ckpt))},
                           description=f"pseudo-mask dump, one task per shard, for {run.path}")
        specs.append((spec, ("train",)))
    cmd = python_cmd("pipelines", "pseudo-labels", "--config", conf, "--run", name, "--scheduler", "local",
                     "--gpus", str(options.job_gpus("pseudo-labels")))
    specs.append((JobSpec(stage="pseudo-labels", template="job.sbatch", values={"command": shlex.join(cmd)},
                          description=f"manifest and pseudo-mask metrics for {run.path}"), ("train", "dump")))
    return submit_jobs(specs, run=run, options=options, env=env)


def _upstream(run: RunDir, stages: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Ids of the recorded ``stages`` jobs still pending/running, and the state of the others."""
    jobs = load_jobs(jobs_file(run))
    active, ended = [], {}
    for stage, counts in _states(jobs, stages).items():
        if is_active(counts):
            active.append(str(jobs[stage]["job_id"]))
        else:
            ended[stage] = f"job {jobs[stage]['job_id']} {summarize(counts)} (log {jobs[stage]['log']})"
    return active, ended


def _submit_retrain(cfg: Any, run: RunDir, s2_config: str, *, gpus: int = 1, overwrite: bool = False,
                    s2_options: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None
                    ) -> Dict[str, str]:
    """See :func:`submit_retrain` (called with the submit lock held)."""
    if _already_queued(run, ("retrain",)):
        _logger.info("a retrain job of this run is still queued or running: nothing submitted")
        return {}
    paths = Paths(run)
    if paths.stage2_metrics.is_file() and not overwrite:
        _logger.info("%s exists: no retrain job (OVERWRITE=1 to retrain)", paths.stage2_metrics)
        return {}
    deps, ended = _upstream(run, ("pseudo-labels",))
    if not deps and not manifest_complete(paths, cfg):
        detail = f"; the last pseudo-labels {ended['pseudo-labels']}" if "pseudo-labels" in ended else ""
        raise StageError(f"{paths.manifest} is missing or incomplete and no pseudo-labels job is queued{detail}: "
                         f"run `make pseudo-labels` for this DATASET/RUN first")
    options = SbatchOptions.from_env(gpus=gpus, env=env)
    cmd = python_cmd("pipelines", "retrain", "--config", str(run.config_file), "--run", cfg.run.name,
                     "--cfg-options", f"run.root={cfg.run.root}",  # the root that found the run (it may have moved)
                     "--scheduler", "local", "--gpus", str(max(options.job_gpus("retrain"), 1)),
                     "--model", s2_config, *(["--overwrite"] if overwrite else []),
                     *(["--s2-options", *(f"{k}={v}" for k, v in s2_options.items())] if s2_options else []))
    spec = JobSpec(stage="retrain", template="job.sbatch", values={"command": shlex.join(cmd)},
                   description=f"stage-2 retraining ({s2_config}) for {run.path}")
    return submit_jobs([(spec, deps)], run=run, options=options, env=env)


def _submit_report(cfg: Any, run: RunDir, *, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """See :func:`submit_report` (called with the submit lock held)."""
    if _already_queued(run, ("report",)):
        _logger.info("a report job of this run is still queued or running: nothing submitted")
        return {}
    deps, _ = _upstream(run, ("pseudo-labels", "retrain"))
    options = SbatchOptions.from_env(gpus=0, env=env)
    cmd = python_cmd("pipelines", "report", "--config", str(run.config_file), "--run", cfg.run.name,
                     "--cfg-options", f"run.root={cfg.run.root}", "--scheduler", "local")
    spec = JobSpec(stage="report", template="job.sbatch", values={"command": shlex.join(cmd)},
                   description=f"report for {run.path}")
    return submit_jobs([(spec, deps)], run=run, options=options, env=env)


def submit_pseudo_labels(cfg: Any, run: RunDir, *, gpus: int = 1, env: Optional[Mapping[str, str]] = None
                         ) -> Dict[str, str]:
    """Submit training (unless its checkpoint exists), the per-shard dump array and the finalise job.

    Nothing is submitted while earlier jobs of this run are still queued, or when the manifest and
    mask metrics exist. The dataset is checked (the synthetic one generated) here, before anything is
    queued, so a missing dataset fails at once rather than in a job.

    Returns:
        Stage name -> job id of the jobs submitted.

    Raises:
        SlurmError: another submitter of this run is running (or SLURM does not answer).
    """
    with SubmitLock(run):
        return _submit_pseudo_labels(cfg, run, gpus=gpus, env=env)


def submit_retrain(cfg: Any, run: RunDir, s2_config: str, *, gpus: int = 1, overwrite: bool = False,
                   s2_options: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None
                   ) -> Dict[str, str]:
    """Submit the stage-2 job, after the pseudo-labels job if that is still queued.

    Args:
        s2_options: stage-2 config overrides, passed on to the job's ``--s2-options``.
        overwrite: retrain even if the stage-2 metrics exist (``--overwrite``).

    Raises:
        StageError: no pseudo-labels job is queued and the manifest is missing or incomplete.
        SlurmError: another submitter of this run is running (or SLURM does not answer).
    """
    with SubmitLock(run):
        return _submit_retrain(cfg, run, s2_config, gpus=gpus, overwrite=overwrite, s2_options=s2_options, env=env)


def submit_report(cfg: Any, run: RunDir, *, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Submit the report job, after the retrain and pseudo-labels jobs that are still queued."""
    with SubmitLock(run):
        return _submit_report(cfg, run, env=env)


__all__ = ["SubmitLock", "SbatchOptions", "JobSpec", "SlurmError", "render_script", "job_name", "load_jobs",
           "record_jobs",
           "parse_scontrol", "summarize", "job_states", "cancel_jobs", "submit_pseudo_labels", "submit_retrain",
           "submit_report"]
