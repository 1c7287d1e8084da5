"""DistributedDataParallel training with CRL mined over the global batch of all ranks.

    torchrun --nproc_per_node 2 examples/ddp/train_ddp.py              # CPU processes, gloo
    torchrun --nproc_per_node 4 examples/ddp/train_ddp.py --amp        # one process per GPU, nccl

Each rank draws `--batch-size` samples per step. A minority class with a 1:30 prior has about one
sample in a rank's batch of 32, too few for CRL to mine; `BalancedLoss(distributed=True)`
profiles and mines over the samples of all ranks together, and each step's parameter gradient is
that of one process training on the concatenated batch.

DistributedSampler gives every rank the same number of samples, so in every step, the short last
batch of an epoch included, the ranks' batch sizes agree: `batch_sizes="equal"` declares it, and
the loss then runs without a host synchronisation (the sizes are checked on the first step and
when they change). Where ranks may hold different numbers of samples in a step, leave the default
`batch_sizes="gathered"`. The loop reads the loss and the mining statistics on the host once per
epoch, not every step.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import crl_ops

NUM_CLASSES = (2, 3, 5)
PRIORS = ((30.0, 1.0), (8.0, 3.0, 1.0), (16.0, 8.0, 4.0, 2.0, 1.0))
INPUT_SIZE = 12


def imbalanced_attributes(num_samples: int, seed: int):
    """Inputs whose class means differ per attribute, with long-tailed class priors."""
    g = torch.Generator().manual_seed(seed)
    means = torch.Generator().manual_seed(1234)  # the same class means for every split
    labels = torch.stack([torch.multinomial(torch.tensor(p), num_samples, replacement=True, generator=g)
                          for p in PRIORS], 1)
    x = torch.randn(num_samples, INPUT_SIZE, generator=g)
    for j, classes in enumerate(NUM_CLASSES):
        x += 1.5 * torch.randn(classes, INPUT_SIZE, generator=means)[labels[:, j]]
    return x, labels


class AttributeNet(nn.Module):
    """A shared trunk, then a feature head and a classifier per attribute."""

    def __init__(self, width: int = 64, feature_size: int = 16):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(INPUT_SIZE, width), nn.ReLU())
        self.features = nn.ModuleList(nn.Sequential(nn.Linear(width, feature_size), nn.ReLU()) for _ in NUM_CLASSES)
        self.classifiers = nn.ModuleList(nn.Linear(feature_size, c) for c in NUM_CLASSES)

    def forward(self, x):
        h = self.trunk(x)
        features = [head(h) for head in self.features]
        return torch.stack(features, 1), [head(f) for head, f in zip(self.classifiers, features)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    parser.add_argument("--amp", action="store_true", help="autocast the model to bfloat16")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)

    train_set = TensorDataset(*imbalanced_attributes(3000, seed=0))
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(AttributeNet().to(device), device_ids=[device] if on_gpu else None)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = crl_ops.BalancedLoss(mode="instance", form="relative", backend=args.backend, distributed=True,
                                     batch_sizes="equal")

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total_loss = torch.zeros((), device=device)
        anchors = torch.zeros((), dtype=torch.long, device=device)
        for x, labels in loader:
            x, labels = x.to(device), labels.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                features, logits = model(x)
                loss = criterion(features, logits, labels)  # the global batch's loss, on every rank
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total_loss += loss.detach()
            anchors += criterion.last_stats.num_anchors.sum()
        if rank == 0:
            print(f"epoch {epoch}: mean loss {total_loss.item() / len(loader):.4f}; {anchors.item()} minority anchors "
                  f"mined in {len(loader)} global batches of {world_size} ranks")

    if rank == 0:
        x, labels = imbalanced_attributes(2000, seed=1)
        with torch.no_grad():
            _, logits = model.module(x.to(device))
        preds = torch.stack([lg.argmax(1) for lg in logits], 1).cpu()
        accuracy = crl_ops.class_balanced_accuracy(preds, labels, NUM_CLASSES)
        print("class-balanced accuracy per attribute:",
              " ".join(f"{100 * a:.1f}%" for a in accuracy.per_attribute.tolist()),
              f"(mean {100 * accuracy.mean.item():.1f}%)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
