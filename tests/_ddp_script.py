"""A user's DDP training script with FisherProbe inside (run by tests/test_distributed.py under torchrun).

``_ddp_script.py OUT [SNAPSHOT_OUT]``: with a second argument, the same processes then also write the
distributed test's snapshot of one global batch (:func:`tests._dist_worker.snapshot`) — a check of
the test's own, run here so that two ranks need not start Python and torch once more.
"""

import sys

import torch
from torch import distributed as dist
from torch import nn

import fisherlab as fl

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
probe = fl.FisherProbe(model, loss="ce", every=3, methods=["kfac", "kpsvd", "deflation"], out=sys.argv[1])
gen = torch.Generator().manual_seed(1)
for step in range(5):
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    x, y = x[rank::world], y[rank::world]  # this rank's share of the global batch
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    probe.step(step, x, y)
probe.close()
dist.barrier()  # nobody tears the group down while another rank still finishes its last step

if len(sys.argv) > 2:  # the test's own part (not the user's): the snapshot of one sharded global batch
    from tests._dist_worker import snapshot

    snapshot(world, rank, sys.argv[2]).close()
    dist.barrier()

del model
dist.destroy_process_group()
