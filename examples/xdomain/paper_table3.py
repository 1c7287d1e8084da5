"""The paper's Table 3 (X-Domain, class-balanced accuracy %), columns named as in the manifest header.

Transcribed from Dong, Gong & Zhu, ICCV 2017, Table 3 (category, colour, collar, button, pattern,
shape, length, sleeve shape, sleeve length), with its imbalance ratio row ("1:x").
"""

from paper.models import XDOMAIN_ATTRIBUTES

ATTRIBUTES = XDOMAIN_ATTRIBUTES  # Table 3's columns, as named in the manifest

# Imbalance ratios (1:x) in the paper's training data: 2, 138, 210, 242, 476, 2138, 3401, 4115, 4162.

# Per method: (accuracy per attribute, average).
TABLE3 = {
    "DDAN": ((46.12, 31.28, 22.44, 40.21, 29.54, 23.21, 32.22, 19.53, 40.21), 31.64),
    "FashionNet": ((48.45, 36.82, 25.27, 43.85, 31.60, 27.37, 38.56, 20.53, 45.16), 35.29),
    "DARN": ((65.63, 44.20, 31.79, 58.30, 44.98, 28.57, 45.10, 18.88, 51.74), 43.24),
    "MTCT": ((72.51, 74.68, 70.54, 76.28, 76.34, 68.84, 77.89, 67.45, 77.21), 73.53),
    "Over-Sampling": ((73.34, 75.12, 71.66, 77.35, 77.52, 68.98, 78.66, 67.90, 78.19), 74.30),
    "Down-Sampling": ((49.21, 33.19, 19.67, 33.11, 22.22, 30.33, 23.27, 12.49, 13.10), 26.29),
    "Cost-Sensitive": ((76.07, 77.71, 71.24, 79.19, 77.37, 69.08, 78.08, 67.53, 77.17), 74.49),
    "LMLE": ((75.90, 77.62, 70.84, 78.67, 77.83, 71.27, 79.14, 69.83, 80.83), 75.77),
    "CRL(C)": ((76.85, 79.61, 74.40, 81.01, 81.19, 73.36, 81.71, 74.06, 81.99), 78.24),
    "CRL(I)": ((77.41, 81.50, 76.60, 81.10, 82.31, 74.56, 83.05, 75.49, 84.92), 79.66),
}
# The rows printed beside measured results (MTCT: the paper's baseline network trained with CE).
SHOWN = ("MTCT", "LMLE", "CRL(I)")
