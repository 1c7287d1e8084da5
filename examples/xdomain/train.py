"""Train and test the paper's X-Domain model (section 3.2, Table 3): CE, a baseline, or CE + CRL.

    python examples/xdomain/train.py --manifest DATA/manifest.tsv --out runs/xdomain/crl-i-r --loss crl --mode instance
    python examples/xdomain/train.py --manifest DATA/manifest.tsv --out runs/xdomain/ce --loss ce

The manifest lists the images and their nine attribute labels (format: crl_ops/data.py). The
network is paper.models.XDomainNet (MTCT: five NIN units, nine three-layer FC branches), with
the class counts read from the manifest's header; the split is the paper's random 165,467 /
80,000 (paper.data.xdomain_split, fixed seed). Defaults follow the paper: SGD, lr 0.001,
momentum 0.9, weight decay 0.0005, batch 256, 150 epochs. The paper fine-tunes an ImageNet
pre-trained trunk: pass its weights with --init (a state_dict of XDomainNet, or a run's last.pt,
matched by name; the trunk's parameters are enough). OUT gets last.pt, log.csv, results.json and table.md
(Table 3's layout with the paper's MTCT, LMLE and CRL(I) rows beside the measured one).
examples/xdomain/report.py combines several runs (all of Table 3, Figure 6, Table 4).
"""
import argparse
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent), str(EXAMPLES)]  # from a checkout: crl_ops, and the paper package

import paper_table3  # noqa: E402 (next to this script)
from paper import reporting  # noqa: E402
from paper.data import ImageAttributeDataset, read_xdomain, xdomain_split  # noqa: E402
from paper.models import XDomainNet  # noqa: E402
from paper.training import add_run_arguments, run_experiment  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="X-Domain manifest (.tsv)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the random train/test split")
    parser.add_argument("--init", default=None, help="pre-trained weights (state_dict file) to start from")
    add_run_arguments(parser, epochs=150, batch_size=256)
    args = parser.parse_args(argv)

    index = read_xdomain(args.manifest)
    train, test = (index.subset(part) for part in xdomain_split(len(index.paths), args.split_seed))
    if args.limit:
        train, test = (split.subset(range(min(args.limit, len(split.paths)))) for split in (train, test))
    model = XDomainNet(num_classes=index.num_classes)
    if args.init:
        weights = torch.load(args.init, map_location="cpu", weights_only=False)
        weights = weights.get("model", weights)  # a run's last.pt, or a plain state_dict
        missing, unexpected = model.load_state_dict(weights, strict=False)
        print(f"initialised from {args.init}: {len(missing)} parameters left at random, {len(unexpected)} ignored")
    size = XDomainNet.input_size[1:]
    record = run_experiment(args, "xdomain", model, ImageAttributeDataset(train, size), ImageAttributeDataset(test, size),
                            train.labels, index.attributes, index.num_classes)
    paper = reporting.paper_rows(paper_table3.TABLE3, paper_table3.ATTRIBUTES, paper_table3.SHOWN, index.attributes)
    reporting.write_run_table(record, paper, args.out)


if __name__ == "__main__":
    main()
