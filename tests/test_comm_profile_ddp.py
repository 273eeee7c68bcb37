"""The profiler's communication hook reduces gradients bit for bit as DDP does
without one, on three real gloo processes: three because 1/3 is not exact in
binary, so dividing a bucket by the world size and multiplying it by the
reciprocal (what DDP's reducer does) round differently. A two-rank world
cannot tell them apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 3

RANK = r"""
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from gemini.workload.comm_profile import CommProfiler

rank, world, store_path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
store = dist.FileStore(store_path, world)
dist.init_process_group("gloo", store=store, rank=rank, world_size=world)

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))

def dividing(state, bucket):
    buf = bucket.buffer()
    buf.div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

plain, hooked, divided = DDP(model()), DDP(model()), DDP(model())
# Past its profile, signalling each completed all-reduce to an interleaving sender.
signalled = DDP(model())
CommProfiler(steps=2, skip=0).install(hooked)
signals = []
done = CommProfiler(steps=0)
done.on_comm_done = lambda: signals.append(1)
done.install(signalled)
divided.register_comm_hook(None, dividing)
torch.manual_seed(1 + rank)
x = torch.randn(32, 64)
for m in (plain, hooked, divided, signalled):
    m(x).square().sum().backward()

def grads(m):
    return torch.cat([p.grad.flatten() for p in m.parameters()])

if rank == 0:
    same = torch.equal(grads(plain), grads(hooked))
    differs = not torch.equal(grads(plain), grads(divided))
    same_signalled = torch.equal(grads(plain), grads(signalled))
    open(out, "w").write(f"{int(same)} {int(differs)} {int(same_signalled)} {len(signals)}")
# Every rank done before any tears down: a rank whose peers already closed
# their connections can abort inside gloo's teardown.
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_the_hook_reduces_as_ddp_does_on_three_ranks(tmp_path: Path) -> None:
    out = tmp_path / "result"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(r), str(WORLD), str(tmp_path / "store"), str(out)],
            env=env,
        )
        for r in range(WORLD)
    ]
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * WORLD
    same, differs, same_signalled, signals = out.read_text().split()
    # The hook's gradients equal DDP's own ...
    assert same == "1"
    # ... and this world is one where dividing instead would have shown.
    assert differs == "1"
    # Signalling the span clock leaves them as they are too; each bucket's
    # completed all-reduce signals.
    assert same_signalled == "1"
    assert int(signals) >= 1
