"""Fault injection (issue 17): ``kill -9`` at random points of train, dump, finalise and retrain, then re-run.

An uninterrupted run of ``python -m pipelines pseudo-labels`` and ``retrain`` on the tiny synthetic config is
the reference. Each case starts the same command in a fresh run directory, kills the pipeline process with
SIGKILL at a random moment of one stage (seeded), and checks that

* no process of the killed tree survives it (stage commands, CRF workers, resource tracker: they die with
  their parent), and
* re-running the same command finishes with the same shards (decoded labels and confidences), mask metrics
  and stage-2 metrics as the reference.

``WSSS_FAULT_SEEDS`` (default ``0,1,2``: three kill points per stage) sets the seeds, e.g. ``WSSS_FAULT_SEEDS=0``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from stage1_cam.io import ShardReader, shard_filename

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"
RUN = "fault"
OPTIONS = ["data.synthetic.num_train=16", "data.synthetic.num_val=4", "train.max_iters=16", "train.ckpt_interval=4",
           "train.val_interval=0", "head.rfm.start_step=8", "data.crop_size=96", "data.num_workers=0",
           "dump.num_shards=2", "dump.long_side=128", "dump.batch_size=4", "dump.crf.workers=1"]
S2_OPTIONS = ["train_cfg.max_iters=6", "train_cfg.val_interval=6", "default_hooks.checkpoint.interval=3",
              "train_dataloader.batch_size=4", "train_dataloader.num_workers=0", "val_dataloader.num_workers=0",
              "test_dataloader.num_workers=0"]
STAGE_MODULE = {"train": "stage1_cam.train", "dump": "stage1_cam.dump", "retrain": "stage2_seg.train"}
SEEDS = [int(s) for s in os.environ.get("WSSS_FAULT_SEEDS", "0,1,2").split(",") if s.strip()]

pytestmark = pytest.mark.slow


def _args(command: str, root: Path) -> List[str]:
    args = [command, "--config", TINY, "--run", RUN, "--cfg-options", f"run.root={root}", *OPTIONS]
    if command == "retrain":
        args += ["--s2-options", *S2_OPTIONS]
    return args


def _env(data: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WSSS_RUN_LOCK"}
    return {**env, "WSSS_DATA_ROOT": str(data), "OMP_NUM_THREADS": "1"}


def _run(command: str, root: Path, data: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines", *_args(command, root)], cwd=REPO, env=_env(data),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------ process tree
def _stat(pid: int) -> Optional[Tuple[int, str, int]]:
    """(parent pid, state, start time) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> Dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    parents: Dict[int, List[int]] = {}
    starts: Dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[1] != "Z":
                parents.setdefault(st[0], []).append(int(d.name))
                starts[int(d.name)] = st[2]
    out, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def _survivors(seen: Dict[int, int], timeout: float) -> List[str]:
    """Processes of ``seen`` (same pid and start time) still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p, t in seen.items() if (st := _stat(p)) is not None and st[2] == t and st[1] != "Z"]
        if not left or time.monotonic() > deadline:
            return [f"{p}: {_cmdline(p)[:200]}" for p in left]
        time.sleep(0.2)


def _kill_during(command: str, root: Path, data: Path, *, stage: str, delay: float, shard_dir: Path
                 ) -> Tuple[Dict[int, int], bool]:
    """Start ``command``; SIGKILL the pipeline process ``delay`` s into ``stage`` (``finalise``: right after the
    last shard is finished). Returns every descendant seen, and whether the kill happened before the end."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", *_args(command, root)], cwd=REPO, env=_env(data),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: Dict[int, int] = {}
    t_stage: Optional[float] = None
    last_shard = shard_dir / shard_filename(1, 2)
    killed = False
    try:
        deadline, next_scan = time.monotonic() + 900, 0.0
        while proc.poll() is None and time.monotonic() < deadline:
            if time.monotonic() >= next_scan:  # the process tree every 0.2 s (a full /proc scan is not free)
                tree = _descendants(proc.pid)
                seen.update(tree)
                next_scan = time.monotonic() + 0.2
                if t_stage is None and stage != "finalise" and any(STAGE_MODULE[stage] in _cmdline(p) for p in tree):
                    t_stage = time.monotonic()
            if t_stage is None and stage == "finalise" and last_shard.is_file():
                t_stage = time.monotonic()
            if t_stage is not None and time.monotonic() - t_stage >= delay:
                seen.update(_descendants(proc.pid))
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and not killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return seen, killed


# ------------------------------------------------------------------------------------------ results
def _shards(shard_dir: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    with ShardReader(shard_dir) as r:
        return {n: (r.label(n), r.confidence(n)) for n in r.ids}


def _mask_metrics(run: Path) -> Dict:
    m = json.loads((run / "pseudo_masks" / "metrics.json").read_text())
    return {k: m[k] for k in ("images", "miou", "final", "final_confident", "confusion", "config_hash")}


def _stage2_metrics(run: Path) -> Dict:
    m = json.loads((run / "stage2" / "metrics.json").read_text())
    # provenance, not figures: the time, and the checkpoint's bytes (mmengine stores run times and message-hub state)
    return {k: v for k, v in m.items()
            if k not in ("config", "checkpoint", "data_root", "computed_at", "checkpoint_sha256")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, with the seconds each stage took (from stage_costs.json)."""
    base = tmp_path_factory.mktemp("faults")
    data, root = base / "data", base / "ref"
    _run("pseudo-labels", root, data)
    _run("retrain", root, data)
    run = root / "synthetic" / RUN
    costs = json.loads((run / "stage_costs.json").read_text())
    return {"base": base, "data": data, "run": run, "shards": _shards(run / "pseudo_masks"),
            "masks": _mask_metrics(run), "stage2": _stage2_metrics(run),
            "seconds": {"train": costs["stage1 training"]["seconds"], "dump": costs["pseudo-mask dump"]["seconds"],
                        "retrain": costs["stage2 training"]["seconds"], "finalise": 0.5}}


def _start_from(reference: Dict, root: Path, keep: Tuple[str, ...]) -> None:
    """A run directory holding the reference's outputs ``keep`` (relative paths), as a finished earlier stage."""
    run = root / "synthetic" / RUN
    for name in ("config.py", "config_hash.txt", "env.json", *keep):
        src = reference["run"] / name
        dst = run / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    config = run / "config.py"  # the resolved config names the run's root
    config.write_text(config.read_text().replace(str(reference["run"].parents[1]), str(root)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", ["train", "dump", "finalise", "retrain"])
def test_kill_9_then_rerun_gives_the_uninterrupted_result(reference, stage, seed):
    rng = random.Random(f"{stage}-{seed}")
    root = reference["base"] / f"{stage}-{seed}"
    run = root / "synthetic" / RUN
    if stage in ("dump", "finalise"):
        _start_from(reference, root, ("stage1/checkpoints",))
    elif stage == "retrain":
        _start_from(reference, root, ("stage1/checkpoints", "pseudo_masks"))
    command = "retrain" if stage == "retrain" else "pseudo-labels"
    delay = rng.uniform(0.0, 0.7) * reference["seconds"][stage]
    seen, killed = _kill_during(command, root, reference["data"], stage=stage, delay=delay,
                                shard_dir=run / "pseudo_masks")
    assert killed, f"the {stage} stage was never reached (or the command ended before the kill)"
    assert seen, "the pipeline had started no stage process"
    left = _survivors(seen, timeout=15.0)
    assert not left, f"processes outlived the killed pipeline ({stage}, {delay:.2f} s in):\n" + "\n".join(left)

    _run(command, root, reference["data"])  # the re-run resumes (or redoes) what the kill cut off
    if command == "pseudo-labels":
        got = _shards(run / "pseudo_masks")
        assert sorted(got) == sorted(reference["shards"])
        for name, (label, conf) in reference["shards"].items():
            np.testing.assert_array_equal(got[name][0], label, err_msg=name)
            np.testing.assert_array_equal(got[name][1], conf, err_msg=name)
        assert _mask_metrics(run) == reference["masks"]
    else:
        assert _stage2_metrics(run) == reference["stage2"]
    assert not (run / "run.lock").exists(), "the finished re-run released the run lock"
