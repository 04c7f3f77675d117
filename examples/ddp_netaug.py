"""NetAug with DistributedDataParallel, launched by torchrun.

CPU (what the tests run):
    torchrun --standalone --nproc_per_node=2 examples/ddp_netaug.py --out runs/ddp_netaug
Many GPUs: add --backend nccl and --nproc_per_node=<GPUs>.

Every rank builds the same augmented model (fxexpand.compile is deterministic) and draws the
augmented configuration of each step from (seed, step) alone, so all ranks run the same augmented
model without communicating; a run resumed from rank 0's checkpoint (--resume) continues the same
sequence. --separate-backward runs the base backward in DDP's no_sync (one all-reduce per step).
Each rank writes its sampled configurations, weights and contracted tiny model to --out.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxexpand
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.passes import AugmentWidth
from fxexpand.training import sync_buffers, unwrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for per-rank results and the checkpoint")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after this many epochs")
    ap.add_argument("--resume", default=None, help="checkpoint written by rank 0")
    ap.add_argument("--separate-backward", action="store_true", help="two backward passes (lower peak memory)")
    ap.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    ap.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    torch.set_num_threads(1)

    xtr, ytr, xte, yte = load_digits()
    model = fxexpand.compile(DigitsNet(), passes=[AugmentWidth()], example_inputs=(xtr[:2],)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start_epoch = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"]
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    ds = TensorDataset(xtr, ytr)
    data_sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=data_sampler, drop_last=True)
    widths = fxexpand.WidthSampler(ddp, seed=0, total_steps=args.epochs * len(loader))

    configs = []
    end = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, end):
        data_sampler.set_epoch(epoch)
        ddp.train()
        for i, (x, y) in enumerate(loader):
            step = epoch * len(loader) + i  # the global step: what a resumed run recomputes
            configs.append(widths.sample(step))
            opt.zero_grad(set_to_none=True)
            loss = fxexpand.netaug_loss(ddp, widths, step, x.to(device), y.to(device), F.cross_entropy,
                                        separate_backward=args.separate_backward)
            if not args.separate_backward:
                loss.backward()
            opt.step()
    sync_buffers(ddp)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": unwrap(ddp).state_dict(), "optimizer": opt.state_dict(), "epoch": end},
                   out / "checkpoint.pt")
    dist.barrier()
    net = unwrap(ddp).eval()
    tiny = DigitsNet()
    tiny.load_state_dict(fxexpand.contract(net.cpu(), (xte[:16],)).state_dict())
    result = {"configs": configs, "weights": {k: v.cpu() for k, v in net.state_dict().items()},
              "contracted": tiny.state_dict(),
              "accuracy": float((tiny.eval()(xte).argmax(1) == yte).float().mean())}
    torch.save(result, out / f"rank{rank}{'_resumed' if args.resume else ''}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
