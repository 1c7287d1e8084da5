"""The reproduction's tests import its shared package `paper` from examples/, and crl_ops from the checkout."""
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
for folder in (EXAMPLES, EXAMPLES.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
