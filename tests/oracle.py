"""A slow, loop-by-loop float64 oracle of docs/semantics.md, written independently of crl_ops.

Inputs are canonical: features [B, A, D] float64, logits as a list of A float64 tensors
[B, C_j], labels as a list of B lists of A ints (-1 = not annotated). Gradients come from
autograd through the per-pair loops.
"""
from __future__ import annotations

import math

import torch


def profile(labels, num_classes):
    """Per attribute: (counts list, minority set, active set)."""
    result = []
    for j, classes in enumerate(num_classes):
        column = [row[j] for row in labels if row[j] != -1]
        counts = [column.count(c) for c in range(classes)]
        order = sorted(range(classes), key=lambda c: (counts[c], c))
        minority, total = set(), 0
        for c in order:
            if 2 * (total + counts[c]) >= len(column):  # the prefix must stay strictly below n / 2
                break
            total += counts[c]
            minority.add(c)
        result.append((counts, minority, {c for c in minority if counts[c] >= 2}))
    return result


def _distance(u, v) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def _softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _argmax(row) -> int:
    best = 0
    for c, v in enumerate(row):
        if v > row[best]:
            best = c
    return best


def mine(features, logits, labels, mode, k):
    """{(i, j): (positives set, negatives set)} for every anchor."""
    batch_size = len(labels)
    num_classes = [lj.shape[1] for lj in logits]
    profiles = profile(labels, num_classes)
    mined = {}
    for j in range(len(num_classes)):
        active = profiles[j][2]
        rows = logits[j].tolist()
        probs = [_softmax(r) for r in rows]
        preds = [_argmax(r) for r in rows]
        vectors = features[:, j].tolist()
        for c in sorted(active):
            members = [i for i in range(batch_size) if labels[i][j] == c]
            others = [i for i in range(batch_size) if labels[i][j] not in (-1, c)]
            if mode == "class":
                hard_pos = sorted(members, key=lambda i: (probs[i][c], i))[:k]
                hard_neg = sorted(others, key=lambda i: (-probs[i][c], i))[:k]
                for a in members:
                    mined[(a, j)] = ({p for p in hard_pos if p != a}, set(hard_neg))
            else:
                for a in members:
                    wrong = [b for b in members if b != a and preds[b] != c]
                    pos = sorted(wrong, key=lambda b: (-_distance(vectors[a], vectors[b]), b))[:k]
                    neg = sorted(others, key=lambda b: (_distance(vectors[a], vectors[b]), b))[:k]
                    mined[(a, j)] = (set(pos), set(neg))
    return mined


def _d(features, a, b, j):
    return torch.linalg.vector_norm(features[a, j] - features[b, j])  # zero gradient at zero distance


def crl_loss(features, mined, form, margins, apc_margin=1.0, bins=100):
    """l_crl over the mined sets (section 3), differentiable w.r.t. features."""
    zero = features.sum() * 0.0
    if form == "relative":
        terms = []
        for (a, j), (pos, neg) in sorted(mined.items()):
            for p in sorted(pos):
                for n in sorted(neg):
                    terms.append(torch.relu(margins[j] + _d(features, a, p, j) - _d(features, a, n, j)))
        return sum(terms) / len(terms) if terms else zero
    if form == "absolute":
        pos_terms, neg_terms = [], []
        for (a, j), (pos, neg) in sorted(mined.items()):
            pos_terms += [_d(features, a, p, j) ** 2 for p in sorted(pos)]
            neg_terms += [torch.relu(apc_margin - _d(features, a, n, j)) ** 2 for n in sorted(neg)]
        pos_mean = sum(pos_terms) / len(pos_terms) if pos_terms else zero
        neg_mean = sum(neg_terms) / len(neg_terms) if neg_terms else zero
        return 0.5 * (pos_mean + neg_mean)
    # distribution
    per_attribute = []
    for j in range(features.shape[1]):
        pos_d = [_d(features, a, p, j) for (a, jj), (pos, _) in sorted(mined.items()) if jj == j for p in sorted(pos)]
        neg_d = [_d(features, a, n, j) for (a, jj), (_, neg) in sorted(mined.items()) if jj == j for n in sorted(neg)]
        if not pos_d or not neg_d:
            continue
        longest = max(v.item() for v in pos_d + neg_d)

        def histogram(distances):
            h = [zero] * bins
            for v in distances:
                if longest == 0.0:
                    h[0] = h[0] + 1.0
                    continue
                step = longest / (bins - 1)
                t = min(int(v.item() // step), bins - 2)
                while t > 0 and t * step > v.item():  # guard the floor against rounding
                    t -= 1
                w = (v - t * step) / step
                h[t] = h[t] + (1.0 - w)
                h[t + 1] = h[t + 1] + w
            return [x / len(distances) for x in h]

        h_pos, h_neg = histogram(pos_d), histogram(neg_d)
        cumulative, total = zero, zero
        for t in range(bins):
            cumulative = cumulative + h_neg[t]
            total = total + h_pos[t] * cumulative
        per_attribute.append(total)
    return sum(per_attribute) / len(per_attribute) if per_attribute else zero


def cross_entropy(logits, labels):
    total = logits[0].sum() * 0.0
    for i, row in enumerate(labels):
        for j, c in enumerate(row):
            if c != -1:
                total = total - torch.log_softmax(logits[j][i], dim=0)[c]
    return total / len(labels)
