"""ExpandNets on scikit-learn's digits: every conv linearly expanded (CL, ratio 4) and the
classifier expanded (FC), trained, then contracted back exactly to the tiny CNN.

    python examples/expandnets_digits.py --epochs 30 [--mode CL] [--init preserve]
"""

import argparse

import torch

import fxexpand
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.training import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--mode", choices=["CL", "FC"], default="CL", help="CK needs kernels > 3; DigitsNet has 3x3")
    ap.add_argument("--init", choices=["random", "preserve"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits()
    model = DigitsNet()
    expanded = fxexpand.compile(model, passes=fxexpand.recipes.expandnets(args.mode, ratio=4, init=args.init))
    opt = torch.optim.SGD(expanded.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(ytr), 64)]
    Trainer(expanded, opt, epochs=args.epochs).fit(loader)      # linear expansion: nothing to decay
    small = fxexpand.contract(expanded.eval(), (xte[:32],))
    model.load_state_dict(small.state_dict())
    acc = float((model.eval()(xte).argmax(1) == yte).float().mean())
    print(f"ExpandNets-{args.mode} tiny CNN: test accuracy {100 * acc:.2f}%")
    return acc


if __name__ == "__main__":
    main()
