"""A slow, loop-by-loop float64 oracle of docs/semantics.md, written independently of crl_ops.

Inputs are canonical: features [B, A, D] float64, logits as a list of A float64 tensors
[B, C_j], labels as a list of B lists of A ints (-1 = not annotated). Gradients come from
autograd through the per-pair loops.
"""
from __future__ import annotations

import math

import torch


def profile(labels, num_classes, threshold=0.5):
    """Per attribute: (counts list, minority set, active set)."""
    result = []
    for j, classes in enumerate(num_classes):
        column = [row[j] for row in labels if row[j] != -1]
        counts = [column.count(c) for c in range(classes)]
        order = sorted(range(classes), key=lambda c: (counts[c], c))
        minority, total = set(), 0
        for c in order:
            if not float(total + counts[c]) < threshold * float(len(column)):  # strictly below threshold * n
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


def mine(features, logits, labels, mode, k, threshold=0.5):
    """{(i, j): (positives set, negatives set)} for every anchor."""
    batch_size = len(labels)
    num_classes = [lj.shape[1] for lj in logits]
    profiles = profile(labels, num_classes, threshold)
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


def vectors(features, normalize=False):
    """The vectors CRL measures distances between (section 3): the features, L2-normalised with
    `normalize` (a norm below 1e-12 counts as 1e-12)."""
    if not normalize:
        return features
    out = []
    for i in range(features.shape[0]):
        out.append(torch.stack([v / torch.clamp(torch.linalg.vector_norm(v), min=1e-12) for v in features[i]]))
    return torch.stack(out)


def score_space_loss(logits, labels, mined, margins, reduction="pooled"):
    """The journal version's class-level triplets in score space (section 3): with c the anchor's
    class and p = softmax probabilities of class c, max(0, m_j + |p_a - p_p| - (p_a - p_n))."""
    zero = logits[0].sum() * 0.0
    terms = {j: [] for j in range(len(logits))}
    for (a, j), (pos, neg) in sorted(mined.items()):
        c = labels[a][j]

        def p(i):
            return torch.softmax(logits[j][i], dim=0)[c]

        for q in sorted(pos):
            for n in sorted(neg):
                terms[j].append(torch.relu(margins[j] + torch.abs(p(a) - p(q)) - (p(a) - p(n))))
    if reduction == "pooled":
        return _mean([t for j in terms for t in terms[j]], zero)
    return _mean([_mean(terms[j], zero) for j in terms if terms[j]], zero)


def _d(features, a, b, j):
    return torch.linalg.vector_norm(features[a, j] - features[b, j])  # zero gradient at zero distance


def _mean(terms, zero):
    return sum(terms) / len(terms) if terms else zero


def crl_loss(features, mined, form, margins, apc_margin=1.0, bins=100, reduction="pooled"):
    """l_crl over the mined sets (section 3), differentiable w.r.t. features and margins."""
    zero = features.sum() * 0.0
    attributes = range(features.shape[1])
    if form == "relative":
        terms = {j: [] for j in attributes}
        for (a, j), (pos, neg) in sorted(mined.items()):
            for p in sorted(pos):
                for n in sorted(neg):
                    terms[j].append(torch.relu(margins[j] + _d(features, a, p, j) - _d(features, a, n, j)))
        if reduction == "pooled":
            return _mean([t for j in attributes for t in terms[j]], zero)
        return _mean([_mean(terms[j], zero) for j in attributes if terms[j]], zero)
    if form == "absolute":
        pos_terms, neg_terms = {j: [] for j in attributes}, {j: [] for j in attributes}
        for (a, j), (pos, neg) in sorted(mined.items()):
            pos_terms[j] += [_d(features, a, p, j) ** 2 for p in sorted(pos)]
            neg_terms[j] += [torch.relu(apc_margin - _d(features, a, n, j)) ** 2 for n in sorted(neg)]
        if reduction == "pooled":
            everything = [t for j in attributes for t in pos_terms[j]], [t for j in attributes for t in neg_terms[j]]
            return 0.5 * (_mean(everything[0], zero) + _mean(everything[1], zero))
        per_attribute = [0.5 * (_mean(pos_terms[j], zero) + _mean(neg_terms[j], zero))
                         for j in attributes if pos_terms[j] or neg_terms[j]]
        return _mean(per_attribute, zero)
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
                scale = (bins - 1) / longest  # the node rule of section 3, as written there
                u = v * scale
                t = min(math.floor(u.item()), bins - 2)
                w = u - t
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
