"""NetBooster on scikit-learn's digits: expand a tiny CNN with inverted residual blocks, train,
decay the inserted activations to the identity over the last 20% of the epochs (PLT), contract
back to the tiny CNN and evaluate it.

    python examples/netbooster_digits.py --epochs 30
"""

import argparse

import torch

import fxexpand
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.training import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits()
    model = DigitsNet()
    expanded = fxexpand.compile(model, passes=fxexpand.recipes.netbooster(ratio=6, fraction=0.5))
    opt = torch.optim.SGD(expanded.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(ytr), 64)]
    Trainer(expanded, opt, epochs=args.epochs, decay_fraction=0.2).fit(loader)
    small = fxexpand.contract(expanded.eval(), (xte[:32],))   # alpha is 1 now: exact contraction
    model.load_state_dict(small.state_dict())                  # the original tiny CNN, trained
    acc = float((model.eval()(xte).argmax(1) == yte).float().mean())
    print(f"NetBooster tiny CNN: test accuracy {100 * acc:.2f}%, "
          f"contraction error {small.fxexpand_report.verification.max_rel_error('float64'):.1e} (float64, relative)")
    return acc


if __name__ == "__main__":
    main()
