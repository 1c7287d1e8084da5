"""Combine X-Domain runs of examples/xdomain/train.py into Table 3, Figure 6 and Table 4's layouts.

    python examples/xdomain/report.py runs/xdomain/*/results.json --baseline ce --out runs/xdomain/report

Writes OUT/table3.md (every run beside all of the paper's Table 3 rows, attributes sorted by
imbalance ratio; the gains over the baseline run; the CRL runs in Table 4's grid) and
OUT/figure6.png (gain over the baseline per attribute against imbalance ratio).
"""
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent), str(EXAMPLES)]  # from a checkout: crl_ops, and the paper package

import paper_table3  # noqa: E402 (next to this script)
from paper.reporting import report_main  # noqa: E402


def main(argv=None):
    report_main(argv, "xdomain", paper_table3.TABLE3, paper_table3.ATTRIBUTES, "Table 3", "Figure 6")


if __name__ == "__main__":
    main()
