"""BoostNet early exits with DistributedDataParallel, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/ddp_exits.py --out runs/ddp_exits

Every rank builds the same multi-exit model (fxexpand.compile is deterministic) and trains it with
BoostNet's summed loss (fxexpand.exits.loss); every exit head is used in every forward, so DDP
all-reduces every head's gradient every step (no find_unused_parameters needed). Each rank writes
its weights, whether each head had a gradient at each step, and its contracted backbone to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxexpand
from fxexpand import exits
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.passes import InsertEarlyExits
from fxexpand.training import sync_buffers, unwrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits()
    model = fxexpand.compile(DigitsNet(), passes=[InsertEarlyExits(at="blocks")], example_inputs=(xtr[:2],))
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ds = TensorDataset(xtr, ytr)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    heads_had_grad = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            exits.loss(ddp(x), y).backward()
            heads_had_grad.append(all(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                      for p in model.exit_heads.parameters()))
            opt.step()
    sync_buffers(ddp)
    net = unwrap(ddp).eval()
    tiny = DigitsNet()
    tiny.load_state_dict(fxexpand.contract(net, (xte[:16],)).state_dict())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": net.state_dict(), "heads_had_grad": heads_had_grad, "contracted": tiny.state_dict(),
                "exits": len(net(xte[:2]))}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
