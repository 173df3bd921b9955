"""Distributed teardown (issue 16): every rank exits 0 after a good run, its process group's threads joined."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as torch_dist

from stage1_cam.utils import dist as dist_utils
from stage1_cam.utils.dist import shutdown_distributed

REPO = Path(__file__).resolve().parents[1]

# One rank of a 2-process gloo group: DDP step, the all_gather_object that train.py's checkpoint does last, then the
# teardown; prints the gloo threads still alive. A group that outlives the teardown keeps them, and one of them may
# still be releasing the last collective's tensors while the interpreter finalizes (SIGABRT at exit).
RANK_SCRIPT = """
import os
import torch
from stage1_cam.utils.dist import init_distributed, shutdown_distributed

info = init_distributed()
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
ddp(torch.randn(2, 4)).sum().backward()
gathered = [None] * info.world_size
torch.distributed.all_gather_object(gathered, info.rank)
assert gathered == list(range(info.world_size)), gathered
del ddp
shutdown_distributed(ok=True)
names = []
for tid in os.listdir("/proc/self/task"):
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    except OSError:  # a thread that just ended
        pass
print("GLOO_THREADS", sorted(n for n in names if "gloo" in n))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch_dist.is_available() or not os.path.isdir("/proc/self/task"),
                    reason="needs torch.distributed and Linux /proc")
def test_teardown_after_ddp_joins_the_process_group_threads():
    """After init_distributed + DDP + a collective, shutdown_distributed leaves no gloo thread behind on any rank."""
    world, port = 2, _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=240) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        assert "terminate called" not in err, err[-3000:]
        assert "GLOO_THREADS []" in out, f"rank {rank} kept its process group's threads: {out} {err[-2000:]}"


class _Recorder:
    """Stands in for torch.distributed and gc: records the teardown calls in order."""

    def __init__(self, monkeypatch, *, initialized=True, barrier_error=None):
        self.calls = []
        self.barrier_error = barrier_error
        monkeypatch.setattr(dist_utils.torch_dist, "is_initialized", lambda: initialized)
        monkeypatch.setattr(dist_utils.torch_dist, "barrier", self._barrier)
        monkeypatch.setattr(dist_utils.torch_dist, "destroy_process_group", lambda: self.calls.append("destroy"))
        monkeypatch.setattr(dist_utils.gc, "collect", lambda: self.calls.append("gc"))

    def _barrier(self):
        self.calls.append("barrier")
        if self.barrier_error is not None:
            raise self.barrier_error


def test_shutdown_order_barrier_then_collect_then_destroy(monkeypatch):
    rec = _Recorder(monkeypatch)
    shutdown_distributed(ok=True)
    assert rec.calls == ["barrier", "gc", "destroy"]


def test_shutdown_after_failure_skips_the_barrier(monkeypatch):
    rec = _Recorder(monkeypatch)
    shutdown_distributed(ok=False)  # the other ranks may never reach a barrier
    assert rec.calls == ["gc", "destroy"]


def test_shutdown_destroys_the_group_even_when_the_barrier_fails(monkeypatch):
    rec = _Recorder(monkeypatch, barrier_error=RuntimeError("peer gone"))
    with pytest.raises(RuntimeError, match="peer gone"):
        shutdown_distributed(ok=True)
    assert rec.calls == ["barrier", "gc", "destroy"]


def test_shutdown_without_a_group_does_nothing(monkeypatch):
    rec = _Recorder(monkeypatch, initialized=False)
    shutdown_distributed(ok=True)
    assert rec.calls == []


@pytest.mark.parametrize("outcome", ["ok", "bad_input", "bug", "single_process"])
def test_cams_entry_point_tears_the_process_group_down(outcome, monkeypatch, synthetic_root, tmp_path):
    """``python -m stage1_cam.cams`` under a multi-process launcher ends with shutdown_distributed, as train.main does:
    ok=True after a good run, ok=False (no barrier) after bad input or a bug; nothing when launched alone."""
    from types import SimpleNamespace

    from stage1_cam.cams import __main__ as cams_entry
    from stage1_cam.utils.cli import BadInputError
    from stage1_cam.utils.dist import DistInfo

    world = 1 if outcome == "single_process" else 2
    teardowns = []
    monkeypatch.setattr(cams_entry, "init_distributed", lambda: DistInfo(rank=0, local_rank=0, world_size=world))
    monkeypatch.setattr(cams_entry, "shutdown_distributed", teardowns.append)

    def run_cams(cfg, run_dir, device):  # stands in for the CAM computation
        if outcome == "bad_input":
            raise BadInputError("no images in the split")
        if outcome == "bug":
            raise RuntimeError("a bug")
        return tmp_path / "cams"

    monkeypatch.setattr(cams_entry, "run_cams", run_cams)
    monkeypatch.setattr(cams_entry, "build_dataset", lambda *a, **k: SimpleNamespace(has_gt=False, split="val"))
    argv = ["configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py", "--run", "d", "--cfg-options",
            f"data.root={synthetic_root}", f"run.root={tmp_path}"]
    if outcome == "bug":  # re-raised with its traceback, after the teardown
        with pytest.raises(RuntimeError, match="a bug"):
            cams_entry.main(argv)
    else:
        assert cams_entry.main(argv) == (2 if outcome == "bad_input" else 0)
    assert teardowns == {"ok": [True], "bad_input": [False], "bug": [False], "single_process": []}[outcome]
