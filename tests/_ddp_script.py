"""A user's DDP training script with FisherProbe inside (run by tests/test_distributed.py under torchrun)."""

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
del model
dist.destroy_process_group()
