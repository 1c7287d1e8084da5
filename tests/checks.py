"""Comparisons shared by the test files: a backend against the float64 oracle, and gradcheck."""
from __future__ import annotations

import math

import torch

import crl_ops

from . import oracle
from .problems import mined_sets


def oracle_margins(num_classes, margin):
    if margin is None:
        return [2 * math.pi / c for c in num_classes]
    if isinstance(margin, torch.Tensor):
        return list(margin.double().expand(len(num_classes)).unbind())
    if isinstance(margin, float):
        return [margin] * len(num_classes)
    return list(margin)


def oracle_pair_counts(mined, num_attributes):
    """[A, 4]: anchors, positive pairs, negative pairs, triplets of the oracle's mined sets."""
    counts = torch.zeros(num_attributes, 4, dtype=torch.long)
    for (_, j), (pos, neg) in mined.items():
        counts[j] += torch.tensor([1, len(pos), len(neg), len(pos) * len(neg)])
    return counts


def check_against_oracle(problem, mode, form, k, margin=None, apc_margin=1.0, bins=100, threshold=0.5,
                         normalize=False, reduction="pooled", distance="feature", alpha=None, backend="reference",
                         dtype=torch.float64, device="cpu", rtol=1e-9, atol=1e-12, exact_mining=True):
    """BalancedLoss and mine on `backend` against the oracle: mined sets, statistics, both loss
    terms and the gradients w.r.t. every input (a tensor margin that requires grad included)."""
    features, logits, labels, canonical, leaves = problem.inputs(dtype, device)
    if isinstance(margin, torch.Tensor) and margin.requires_grad:
        margin = margin.detach().to(device).requires_grad_()
        leaves = leaves + [margin]
    options = dict(k=k, threshold=threshold, normalize=normalize, backend=backend)
    loss_fn = crl_ops.BalancedLoss(mode, form, margin=margin, apc_margin=apc_margin, bins=bins, reduction=reduction,
                                   distance=distance, alpha=alpha, **options)
    total = loss_fn(features, logits, labels)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    mined = crl_ops.mine(features, logits, labels, mode=mode, **options)

    f64, lg64, lab = canonical()
    margins = oracle_margins(problem.num_classes, margin)
    vectors = oracle.vectors(f64, normalize)
    expected_mined = oracle.mine(vectors.detach(), [x.detach() for x in lg64], lab, mode, k, threshold)
    if exact_mining:
        got_mined = mined_sets(mined, k)
        if got_mined != expected_mined:  # allowed where keys tie to within rounding (section 2)
            _assert_near_ties(got_mined, expected_mined, vectors.detach(), lg64, lab, mode)
            expected_mined = got_mined  # the oracle's loss of the same pairs must still agree
        stats = loss_fn.last_stats
        assert torch.equal(stats.pair_counts.cpu(), oracle_pair_counts(expected_mined, len(problem.num_classes)))
        for j, (counts, minority, active) in enumerate(oracle.profile(lab, problem.num_classes, threshold)):
            assert stats.counts[j, :len(counts)].tolist() == counts
            assert set(stats.minority[j].nonzero().flatten().tolist()) == minority
            assert set(stats.active[j].nonzero().flatten().tolist()) == active
    not_anchor = ~mined.anchors
    assert (mined.positives[not_anchor] == -1).all() and (mined.negatives[not_anchor] == -1).all()

    if distance == "score":
        crl_expected = oracle.score_space_loss(lg64, lab, expected_mined, margins, reduction)
    else:
        crl_expected = oracle.crl_loss(vectors, expected_mined, form, margins, apc_margin, bins, reduction)
    ce_expected = oracle.cross_entropy(lg64, lab)
    total_expected = (ce_expected + crl_expected if alpha is None
                      else (1 - alpha) * ce_expected + alpha * crl_expected)
    expected_grads = torch.autograd.grad(total_expected, leaves, allow_unused=True)

    torch.testing.assert_close(loss_fn.last_crl.double().cpu(), crl_expected.detach().cpu(), rtol=rtol, atol=atol)
    torch.testing.assert_close(loss_fn.last_ce.double().cpu(), ce_expected.detach().cpu(), rtol=rtol, atol=atol)
    for leaf, got, want in zip(leaves, grads, expected_grads):
        got = torch.zeros_like(leaf) if got is None else got
        want = torch.zeros_like(leaf) if want is None else want
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol)
    return loss_fn


def _assert_near_ties(got, want, vectors, logits, labels, mode, tolerance=1e-12):
    """Every difference between two mining results swaps candidates whose keys (the distance to the
    anchor, or the class probability of the anchor's class) agree to `tolerance`, relative."""
    assert got.keys() == want.keys()
    for (a, j), sides in want.items():
        if mode == "instance":
            def key(b):
                return float(torch.linalg.vector_norm(vectors[a, j] - vectors[b, j]))
        else:
            probabilities = torch.softmax(logits[j].detach(), dim=1)[:, labels[a][j]]

            def key(b):
                return float(probabilities[b])
        for side, (mine, theirs) in enumerate(zip(got[(a, j)], sides)):
            assert len(mine) == len(theirs)
            for x, y in zip(sorted(map(key, mine)), sorted(map(key, theirs))):
                assert abs(x - y) <= tolerance * max(abs(x), abs(y), 1e-300), (a, j, side, mine, theirs)


def gradcheck_crl(crl, features, logits, labels):
    """gradcheck of crl w.r.t. features. The distribution form takes no gradient through its range R
    (semantics section 3), so the two feature vectors that span R in each attribute stay fixed."""
    options = crl.options
    free = torch.ones_like(features, dtype=torch.bool)
    if options.form == "distribution":
        mined = crl_ops.mine(features, logits, labels, mode=options.mode, k=options.k, normalize=options.normalize,
                             backend=options.backend)
        partners = torch.cat([mined.positives, mined.negatives], -1)
        measured = features.detach()
        if options.normalize:
            measured = torch.nn.functional.normalize(measured, dim=-1)
        d, _ = crl_ops.reference.pair_distances(measured, partners)
        for j in range(features.shape[1]):
            flat = d[:, j].argmax()
            i, m = divmod(int(flat), d.shape[2])
            free[i, j] = False
            free[int(partners[i, j, m]), j] = False
    base = features.detach()

    def fn(values):
        return crl(base.masked_scatter(free, values), logits, labels)

    return torch.autograd.gradcheck(fn, (features.detach()[free].requires_grad_(),))
