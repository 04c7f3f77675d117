"""NetBooster on a torchvision model with synthetic data (no downloads).

For ImageNet, change the marked lines: build the loader from torchvision.datasets.ImageFolder with
the usual transforms (RandomResizedCrop(224 or 144), flips, normalisation), train for the paper's
schedule (e.g. 150 epochs of the expanded model, then fine-tune with PLT over the last 20% of the
fine-tuning epochs), use a cosine LR schedule, and run it under torchrun + DDP
(see examples/ddp_digits.py).

    python examples/torchvision_synthetic.py --steps 20
"""

import argparse

import torch
import torchvision

import fxexpand
from fxexpand.training import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=96, help="input resolution (NetBooster's MobileNetV2-35: 144)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35)
    expanded = fxexpand.compile(model, passes=fxexpand.recipes.netbooster())
    print(fxexpand.report_table(fxexpand.expansion_report(model, expanded, (torch.randn(1, 3, args.size, args.size),))))
    # ImageNet: replace this synthetic loader with a real DataLoader
    loader = [(torch.randn(8, 3, args.size, args.size), torch.randint(0, 1000, (8,))) for _ in range(args.steps)]
    opt = torch.optim.SGD(expanded.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    Trainer(expanded, opt, epochs=args.epochs, decay_fraction=0.5).fit(loader)
    x = torch.randn(1, 3, args.size, args.size)
    small = fxexpand.contract(expanded.eval(), (x,))
    model.load_state_dict(small.state_dict())                 # torchvision's own MobileNetV2 class again
    print(small.fxexpand_report.summary())
    return small


if __name__ == "__main__":
    main()
