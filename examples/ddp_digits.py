"""Expansion-then-contraction with DistributedDataParallel, launched by torchrun.

CPU (what the tests run):
    torchrun --standalone --nproc_per_node=2 examples/ddp_digits.py --out runs/ddp
Many GPUs (one process per GPU; NCCL):
    torchrun --standalone --nproc_per_node=8 examples/ddp_digits.py --backend nccl --out runs/ddp
Several nodes: replace --standalone by --nnodes N --node_rank R --rdzv_endpoint HOST:PORT.

Every rank builds the same expanded model (fxexpand.compile is deterministic), wraps it in DDP and
runs the same decay schedule: alpha is computed from the integer global step kept in the model's
buffers, so all ranks agree, and a checkpoint saved on rank 0 resumes the schedule (--resume).
After training, each rank contracts the unwrapped model; rank outputs are written to --out so they
can be compared.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxexpand
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.training import DecaySchedule, sync_buffers, unwrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for per-rank results and the checkpoint")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after this many epochs")
    ap.add_argument("--resume", default=None, help="checkpoint written by rank 0")
    ap.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    ap.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    torch.set_num_threads(1)

    model = fxexpand.compile(DigitsNet(), passes=fxexpand.recipes.netbooster()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start_epoch = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])  # includes alpha and the schedule's global step
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"]
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    xtr, ytr, xte, yte = load_digits()
    ds = TensorDataset(xtr, ytr)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    schedule = DecaySchedule(ddp, epochs=args.epochs, steps_per_epoch=len(loader), decay_fraction=0.5)

    end = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, end):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
            opt.step()
            schedule.step()
    sync_buffers(ddp)  # the last step's BN statistics differ per rank; take rank 0's everywhere
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": unwrap(ddp).state_dict(), "optimizer": opt.state_dict(), "epoch": end},
                   out / "checkpoint.pt")
    dist.barrier()
    net = unwrap(ddp).eval()
    result = {"alpha": schedule.alpha, "global_step": schedule.global_step,
              "weights": {k: v.cpu() for k, v in net.state_dict().items()}}
    if schedule.alpha == 1.0:
        small = fxexpand.contract(net.cpu(), (xte[:16],))
        tiny = DigitsNet()
        tiny.load_state_dict(small.state_dict())
        result["contracted"] = tiny.state_dict()
        result["accuracy"] = float((tiny.eval()(xte).argmax(1) == yte).float().mean())
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
