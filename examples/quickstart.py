"""Train one small multi-attribute network with and without CRL on an imbalanced toy problem.

    python examples/quickstart.py [--epochs 30] [--backend auto]

Three attributes of a point cloud in 16-d: a binary one at 1:19, a 4-class one and a 6-class
one with long tails. Prints the class-balanced accuracy (mean per-class recall) of both runs.
"""
import argparse

import torch
from torch import nn
from tqdm import tqdm

import crl_ops

NUM_CLASSES = (2, 4, 6)
PRIORS = ([0.95, 0.05], [0.7, 0.2, 0.07, 0.03], [0.5, 0.25, 0.12, 0.07, 0.04, 0.02])


def make_data(n, generator):
    labels = torch.stack([torch.multinomial(torch.tensor(p), n, replacement=True, generator=generator)
                          for p in PRIORS], 1)
    centres = [torch.randn(c, 16, generator=torch.Generator().manual_seed(100 + j)) * 1.2
               for j, c in enumerate(NUM_CLASSES)]
    x = sum(centres[j][labels[:, j]] for j in range(len(NUM_CLASSES)))
    return x + 1.5 * torch.randn(n, 16, generator=generator), labels


class Net(nn.Module):
    """A shared trunk, then one 32-d feature head and one classifier per attribute (as in the paper)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(128, 32), nn.ReLU()) for _ in NUM_CLASSES)
        self.classifiers = nn.ModuleList(nn.Linear(32, c) for c in NUM_CLASSES)

    def forward(self, x):
        h = self.trunk(x)
        features = [head(h) for head in self.heads]
        return torch.stack(features, 1), [cls(f) for cls, f in zip(self.classifiers, features)]


def train(use_crl, args, train_set, test_set):
    torch.manual_seed(args.seed)
    model = Net()
    optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    criterion = crl_ops.BalancedLoss(mode="instance", form="relative", weight=args.weight if use_crl else 0.0,
                                     backend=args.backend)
    x, y = train_set
    for _ in tqdm(range(args.epochs), desc="CE + CRL" if use_crl else "CE", leave=False):
        for batch in torch.randperm(len(x)).split(128):
            features, logits = model(x[batch])
            loss = criterion(features, logits, y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        _, logits = model(test_set[0])
        preds = torch.stack([lg.argmax(1) for lg in logits], 1)
    return crl_ops.class_balanced_accuracy(preds, test_set[1], NUM_CLASSES)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight", type=float, default=1.0, help="CRL weight in l_ce + weight * l_crl")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    train_set, test_set = make_data(4000, generator), make_data(4000, generator)
    print(f"native kernels for CPU: {crl_ops.native_available('cpu')}")
    results = {name: train(name == "CE + CRL", args, train_set, test_set) for name in ("CE", "CE + CRL")}
    print(f"{'loss':<10}" + "".join(f"attr{j} (C={c})".rjust(14) for j, c in enumerate(NUM_CLASSES)) + "mean".rjust(8))
    for name, result in results.items():
        cells = "".join(f"{100 * v:14.1f}" for v in result.per_attribute.tolist())
        print(f"{name:<10}{cells}{100 * result.mean.item():8.1f}")
    print("(class-balanced accuracy, %, on a held-out set of 4000)")


if __name__ == "__main__":
    main()
