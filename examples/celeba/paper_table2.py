"""The paper's Table 2 (CelebA, class-balanced accuracy %), by CelebA attribute name.

Transcribed from Dong, Gong & Zhu, ICCV 2017, Table 2; the paper orders the attributes by the
imbalance ratio in the first row ("1:x"). Averages are the table's last column.
"""

# Attribute names as in list_attr_celeba.txt, in the paper's column order (by imbalance ratio, from
# 1:1 for Attractive to 1:43 for Bald).
PAPER_ORDER = (
    "Attractive", "Mouth_Slightly_Open", "Smiling", "Wearing_Lipstick",
    "High_Cheekbones", "Male", "Heavy_Makeup", "Wavy_Hair",
    "Oval_Face", "Pointy_Nose", "Arched_Eyebrows", "Black_Hair",
    "Big_Lips", "Big_Nose", "Young", "Straight_Hair",
    "Brown_Hair", "Bags_Under_Eyes", "Wearing_Earrings", "No_Beard",
    "Bangs", "Blond_Hair", "Bushy_Eyebrows", "Wearing_Necklace",
    "Narrow_Eyes", "5_o_Clock_Shadow", "Receding_Hairline", "Wearing_Necktie",
    "Eyeglasses", "Rosy_Cheeks", "Goatee", "Chubby",
    "Sideburns", "Blurry", "Wearing_Hat", "Double_Chin",
    "Pale_Skin", "Gray_Hair", "Mustache", "Bald",
)

# Per method: (accuracy per attribute in PAPER_ORDER, average).
TABLE2 = {
    "Triplet-kNN": ((83, 92, 92, 91, 86, 91, 88, 77, 61, 61, 73, 82, 55, 68, 75, 63, 76, 63, 69, 82,
        81, 81, 68, 50, 47, 66, 60, 73, 82, 64, 73, 64, 71, 43, 84, 60, 63, 72, 57, 75), 72),
    "PANDA": ((85, 93, 98, 97, 89, 99, 95, 78, 66, 67, 77, 84, 56, 72, 78, 66, 85, 67, 77, 87,
        92, 91, 74, 51, 51, 76, 67, 85, 88, 68, 84, 65, 81, 50, 90, 64, 69, 79, 63, 74), 77),
    "ANet": ((87, 96, 97, 95, 89, 99, 96, 81, 67, 69, 76, 90, 57, 78, 84, 69, 83, 70, 83, 93,
        90, 90, 82, 59, 57, 81, 70, 79, 95, 76, 86, 70, 79, 56, 90, 68, 77, 85, 61, 73), 80),
    "DeepID2": ((78, 89, 89, 92, 84, 94, 88, 73, 63, 66, 77, 83, 62, 73, 76, 65, 79, 74, 75, 88,
        91, 90, 78, 70, 64, 85, 81, 83, 92, 86, 90, 81, 89, 74, 90, 83, 81, 90, 88, 93), 81),
    "Over-Sampling": ((77, 89, 90, 92, 84, 95, 87, 70, 63, 67, 79, 84, 61, 73, 75, 66, 82, 73, 76, 88,
        90, 90, 80, 71, 65, 85, 82, 79, 91, 90, 89, 83, 90, 76, 89, 84, 82, 90, 90, 92), 82),
    "Down-Sampling": ((78, 87, 90, 91, 80, 90, 89, 70, 58, 63, 70, 80, 61, 76, 80, 61, 76, 71, 70, 88,
        88, 85, 75, 66, 61, 82, 79, 80, 85, 82, 85, 78, 80, 68, 90, 80, 78, 88, 60, 79), 78),
    "Cost-Sensitive": ((78, 89, 90, 91, 85, 93, 89, 75, 64, 65, 78, 85, 61, 74, 75, 67, 84, 74, 76, 88,
        90, 89, 79, 71, 65, 84, 81, 82, 91, 92, 86, 82, 90, 76, 90, 84, 80, 90, 88, 93), 82),
    "LMLE": ((88, 96, 99, 99, 92, 99, 98, 83, 68, 72, 79, 92, 60, 80, 87, 73, 87, 73, 83, 96,
        98, 99, 82, 59, 59, 82, 76, 90, 98, 78, 95, 79, 88, 59, 99, 74, 80, 91, 73, 90), 84),
    "CRL(C)": ((80, 92, 90, 93, 85, 96, 88, 81, 68, 77, 80, 88, 68, 77, 85, 76, 82, 79, 82, 91,
        93, 91, 82, 76, 70, 89, 84, 84, 97, 87, 92, 83, 91, 81, 94, 85, 88, 93, 90, 95), 85),
    "CRL(I)": ((83, 95, 93, 94, 89, 96, 84, 79, 66, 73, 80, 90, 68, 80, 84, 73, 86, 80, 83, 94,
        95, 95, 84, 74, 72, 90, 87, 88, 96, 88, 96, 87, 92, 85, 98, 89, 92, 95, 94, 97), 86),
}
# The rows printed beside measured results.
SHOWN = ("DeepID2", "LMLE", "CRL(I)")
