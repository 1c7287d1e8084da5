"""Combine CelebA runs of examples/celeba/train.py into Table 2, Figure 5 and Table 4's layouts.

    python examples/celeba/report.py runs/celeba/*/results.json --baseline ce --out runs/celeba/report

Writes OUT/table2.md (every run beside all of the paper's Table 2 rows, attributes sorted by
imbalance ratio; the gains over the baseline run; the CRL runs in Table 4's grid) and
OUT/figure5.png (gain over the baseline per attribute against imbalance ratio).
"""
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent), str(EXAMPLES)]  # from a checkout: crl_ops, and the paper package

import paper_table2  # noqa: E402 (next to this script)
from paper.reporting import report_main  # noqa: E402


def main(argv=None):
    report_main(argv, "celeba", paper_table2.TABLE2, paper_table2.PAPER_ORDER, "Table 2", "Figure 5")


if __name__ == "__main__":
    main()
