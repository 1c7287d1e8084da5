"""Train and test the paper's CelebA model (section 3.1, Table 2): CE, a baseline, or CE + CRL.

    python examples/celeba/train.py --data DATA --out runs/celeba/crl-i-r --loss crl --mode instance --form relative
    python examples/celeba/train.py --data DATA --out runs/celeba/ce --loss ce
    python examples/celeba/train.py --data DATA --out runs/celeba/oversample --loss ce --baseline oversample

DATA holds CelebA's img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt. The
network is paper.models.CelebANet (DeepID2 trunk, a 64-d FC2 per attribute); the defaults are
the paper's: SGD, lr 0.001, momentum 0.9, weight decay 0.0005, batch 128, 200 epochs, trained on
the 162,770 training images and tested on the 19,962 test images. OUT gets last.pt (after every
epoch; --resume continues), log.csv, results.json and table.md: Table 2's layout, attributes
sorted by imbalance ratio, with the paper's DeepID2, LMLE and CRL(I) rows beside the measured
one. examples/celeba/report.py combines several runs (all of Table 2, Figure 5, Table 4).
"""
import argparse
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent), str(EXAMPLES)]  # from a checkout: crl_ops, and the paper package

import paper_table2  # noqa: E402 (next to this script)
from paper import reporting  # noqa: E402
from paper.data import ImageAttributeDataset, celeba_split, read_celeba  # noqa: E402
from paper.models import CelebANet  # noqa: E402
from paper.training import add_run_arguments, run_experiment  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CelebA folder")
    add_run_arguments(parser, epochs=200, batch_size=128)
    args = parser.parse_args(argv)

    index, partition = read_celeba(args.data)
    train, test = (celeba_split(index, partition, split) for split in ("train", "test"))
    if args.limit:
        train, test = (split.subset(range(min(args.limit, len(split.paths)))) for split in (train, test))
    size = CelebANet.input_size[1:]
    model = CelebANet(num_attributes=len(index.attributes))
    record = run_experiment(args, "celeba", model, ImageAttributeDataset(train, size), ImageAttributeDataset(test, size),
                            train.labels, index.attributes, index.num_classes)
    paper = reporting.paper_rows(paper_table2.TABLE2, paper_table2.PAPER_ORDER, paper_table2.SHOWN, index.attributes)
    reporting.write_run_table(record, paper, args.out)


if __name__ == "__main__":
    main()
