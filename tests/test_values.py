"""Bad input and bad values (docs/semantics.md, section 6), on every CPU backend and variant.

- The bad-input table: every argument's wrong type, shape, dtype, device and range maps to an
  exact exception type whose message names the argument.
- validate=True raises for bad values; validate=False gives the same defined result on every
  backend (out-of-range labels not annotated, NaN loss and gradients for non-finite values).
- Regressions of the adversarial pass of issue #12.
"""
import math

import pytest
import torch

import crl_ops

from . import oracle
from .problems import CPU_BACKENDS, FORMS, MODES, make_problem

B, A, D = 12, 3, 4
VARIANTS = [(mode, form) for mode in MODES for form in FORMS]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def good():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, A, D, generator=g)
    logits = torch.randn(B, A, 2, generator=g)
    labels = torch.tensor([[0, 0, 0]] * 8 + [[1, 1, 1]] * 4)
    return features, logits, labels


def crl(features, logits, labels, backend, mode="instance", form="relative", **options):
    return crl_ops.CRL(mode, form, backend=backend, **options)(features, logits, labels)


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# (id, make the call's (features, logits, labels, options) from good ones, exception, words in the message)
INPUT_ROWS = [
    ("features-not-tensor", lambda f, lg, lb: (1.5, lg, lb, {}), TypeError, "features must be a torch.Tensor"),
    ("features-none", lambda f, lg, lb: (None, lg, lb, {}), TypeError, "features must be a torch.Tensor, got NoneType"),
    ("features-sparse", lambda f, lg, lb: (f.to_sparse(), lg, lb, {}), TypeError, "features must be a dense"),
    ("features-list", lambda f, lg, lb: (f.tolist(), lg, lb, {}), TypeError, "features must be a torch.Tensor"),
    ("features-int", lambda f, lg, lb: (f.long(), lg, lb, {}), TypeError, "features must be float16, bfloat16"),
    ("features-bool", lambda f, lg, lb: (f > 0, lg, lb, {}), TypeError, "features must be float16, bfloat16"),
    ("features-complex", lambda f, lg, lb: (f.to(torch.complex64), lg, lb, {}), TypeError, "features must be float16"),
    ("features-float8", lambda f, lg, lb: (f.to(torch.float8_e4m3fn), lg, lb, {}), TypeError, "features must be float16"),
    ("features-1d", lambda f, lg, lb: (f[:, 0, 0], lg, lb, {}), ValueError, r"features must have shape \[B, A, D\]"),
    ("features-4d", lambda f, lg, lb: (f[None], lg, lb, {}), ValueError, r"features must have shape \[B, A, D\]"),
    ("features-batch", lambda f, lg, lb: (f[:-1], lg, lb, {}), ValueError, "features has batch size 11"),
    ("features-attributes", lambda f, lg, lb: (f[:, :2], lg, lb, {}), ValueError, "features .* has A=2"),
    ("features-no-dims", lambda f, lg, lb: (f[:, :, :0], lg, lb, {}), ValueError, "features must have a feature size"),
    ("features-device", lambda f, lg, lb: (f.to("meta"), lg, lb, {}), ValueError, "must be on one device"),
    ("logits-not-tensor", lambda f, lg, lb: (f, 2.0, lb, {}), TypeError, "logits must be a torch.Tensor"),
    ("logits-sparse", lambda f, lg, lb: (f, lg.to_sparse(), lb, {}), TypeError, "logits must be a dense"),
    ("logits-int", lambda f, lg, lb: (f, lg.long(), lb, {}), TypeError, "logits must be float16"),
    ("logits-batch", lambda f, lg, lb: (f, lg[:-1], lb, {}), ValueError, "logits must have batch size B=12"),
    ("logits-4d", lambda f, lg, lb: (f, lg[None], lb, {}), ValueError, "logits"),
    ("logits-one-class", lambda f, lg, lb: (f, lg[:, :, :1], lb, {}), ValueError, r"logits \[B, A, C\] must have A=3"),
    ("logits-binary-width", lambda f, lg, lb: (f, lg[:, :2, 0], lb, {}), ValueError, r"logits of shape \[12, 2\]"),
    ("logits-list-length", lambda f, lg, lb: (f, list(lg.unbind(1))[:2], lb, {}), ValueError, "list of 2 tensors"),
    ("logits-list-item", lambda f, lg, lb: (f, [lg[:, 0, :1]] + list(lg.unbind(1))[1:], lb, {}), ValueError,
     r"logits\[0\] must have shape"),
    ("logits-list-type", lambda f, lg, lb: (f, [1.0] * 3, lb, {}), TypeError, r"logits\[0\] must be a torch.Tensor"),
    ("logits-device", lambda f, lg, lb: (f, lg.to("meta"), lb, {}), ValueError, "must be on one device"),
    ("labels-not-tensor", lambda f, lg, lb: (f, lg, lb.tolist(), {}), TypeError, "labels must be a torch.Tensor"),
    ("labels-float", lambda f, lg, lb: (f, lg, lb.float(), {}), TypeError, "labels must be an integer tensor"),
    ("labels-bool", lambda f, lg, lb: (f, lg, lb.bool(), {}), TypeError, "labels must be an integer tensor"),
    ("labels-3d", lambda f, lg, lb: (f, lg, lb[None], {}), ValueError, r"labels must have shape \[B, A\]"),
    ("labels-0d", lambda f, lg, lb: (f, lg, lb[0, 0], {}), ValueError, r"labels must have shape \[B, A\]"),
    ("labels-empty-batch", lambda f, lg, lb: (f[:0], lg[:0], lb[:0], {}), ValueError, r"at least one sample"),
    ("labels-no-attribute", lambda f, lg, lb: (f[:, :0], [], lb[:, :0], {}), ValueError, r"at least one attribute"),
    ("labels-device", lambda f, lg, lb: (f, lg, lb.to("meta"), {}), ValueError, "must be on one device"),
    ("labels-too-large", lambda f, lg, lb: (f, lg, with_value(lb, (5, 1), 2), {}), ValueError,
     r"labels\[5, 1\] = 2 is out of range for attribute 1: expected -1 \(not annotated\) or a class in 0\.\.1"),
    ("labels-below-minus-one", lambda f, lg, lb: (f, lg, with_value(lb, (0, 2), -2), {}), ValueError,
     r"labels\[0, 2\] = -2 is out of range"),
    ("labels-mixed-classes", lambda f, lg, lb: (f, [lg[:, 0], torch.randn(B, 5), lg[:, 2]], with_value(lb, (3, 0), 3),
                                                {}), ValueError, r"labels\[3, 0\] = 3 .* attribute 0: .* 0\.\.1"),
    ("features-nan", lambda f, lg, lb: (with_value(f, (3, 1, 2), math.nan), lg, lb, {}), ValueError,
     "features contain NaN or inf"),
    ("features-inf", lambda f, lg, lb: (with_value(f, (0, 0, 0), -math.inf), lg, lb, {}), ValueError,
     "features contain NaN or inf"),
    ("logits-nan", lambda f, lg, lb: (f, with_value(lg, (1, 0, 1), math.nan), lb, {}), ValueError,
     "logits contain NaN or inf"),
    ("logits-inf", lambda f, lg, lb: (f, with_value(lg, (1, 2, 0), math.inf), lb, {}), ValueError,
     "logits contain NaN or inf"),
    ("features-overflow", lambda f, lg, lb: (f * 1e20, lg, lb, {}), ValueError,
     "features are too large: the squared distance of a mined pair overflows float32"),
]

OPTION_ROWS = [
    ("mode", {"mode": "sample"}, ValueError, "mode must be one of"),
    ("form", {"form": "hinge"}, ValueError, "form must be one of"),
    ("k-zero", {"k": 0}, ValueError, "k must be between 1 and 1024, got 0"),
    ("k-huge", {"k": 2**31}, ValueError, "k must be between 1 and 1024"),
    ("k-float", {"k": 2.0}, TypeError, "k must be an int"),
    ("k-bool", {"k": True}, TypeError, "k must be an int"),
    ("margin-string", {"margin": "big"}, TypeError, "margin must be None, a float"),
    ("margin-nan", {"margin": math.nan}, ValueError, "margin must be finite"),
    ("margin-list-nan", {"margin": [1.0, math.nan, 1.0]}, ValueError, r"margin\[1\] must be finite"),
    ("margin-tensor-nan", {"margin": torch.tensor([1.0, math.nan, 1.0])}, ValueError, "margin tensor must be finite"),
    ("margin-tensor-int", {"margin": torch.tensor([1, 2, 3])}, TypeError, "margin tensor must be floating point"),
    ("margin-tensor-2d", {"margin": torch.ones(3, 1)}, ValueError, r"margin tensor must have shape \[A\]"),
    ("apc-margin", {"apc_margin": -1.0}, ValueError, "apc_margin must be finite and >= 0"),
    ("apc-margin-type", {"apc_margin": "1"}, TypeError, "apc_margin must be a float"),
    ("bins-one", {"bins": 1}, ValueError, "bins must be between 2 and 100000"),
    ("bins-huge", {"bins": 10**12}, ValueError, "bins must be between 2 and 100000"),
    ("bins-float", {"bins": 2.5}, TypeError, "bins must be an int"),
    ("threshold-zero", {"threshold": 0.0}, ValueError, "threshold must be finite and > 0.0 and <= 1.0"),
    ("threshold-large", {"threshold": 1.5}, ValueError, "threshold must be finite"),
    ("threshold-type", {"threshold": "half"}, TypeError, "threshold must be a float"),
    ("normalize", {"normalize": "yes"}, TypeError, "normalize must be True or False"),
    ("reduction", {"reduction": "sum"}, ValueError, "reduction must be one of"),
    ("distance", {"distance": "cosine"}, ValueError, "distance must be one of"),
    ("backend", {"backend": "gpu"}, ValueError, "backend must be one of"),
    ("validate-string", {"validate": "no"}, TypeError, "validate must be True or False"),
    ("validate-int", {"validate": 0}, TypeError, "validate must be True or False"),
    ("distributed-type", {"distributed": 1}, TypeError, "distributed must be True or False"),
    ("batch-sizes", {"batch_sizes": "same"}, ValueError, "batch_sizes must be one of"),
]

FORWARD_OPTION_ROWS = [  # options that are checked against the batch, at the first forward
    ("margin-length", {"margin": [1.0, 2.0]}, ValueError, "margin has 2 values but the batch has A=3"),
    ("margin-tensor-length", {"margin": torch.ones(2)}, ValueError, r"margin tensor must have shape \[A=3\]"),
    ("distributed-no-group", {"distributed": True}, ValueError, "distributed=True needs an initialised"),
]


@pytest.mark.parametrize("mode, form", VARIANTS)
@pytest.mark.parametrize("row", INPUT_ROWS, ids=[r[0] for r in INPUT_ROWS])
def test_bad_inputs(row, mode, form, backend):
    _, make, error, words = row
    features, logits, labels, options = make(*good())
    with pytest.raises(error, match=words):
        crl(features, logits, labels, backend, mode, form, **options)


@pytest.mark.parametrize("row", OPTION_ROWS, ids=[r[0] for r in OPTION_ROWS])
def test_bad_options(row, backend):
    _, options, error, words = row
    options = {"backend": backend, **options}
    for make in (lambda: crl_ops.CRL(**options),
                 lambda: crl_ops.BalancedLoss(**options),
                 lambda: crl_ops.class_rectification_loss(*good(), **options)):
        with pytest.raises(error, match=words):
            make()


@pytest.mark.parametrize("row", FORWARD_OPTION_ROWS, ids=[r[0] for r in FORWARD_OPTION_ROWS])
def test_bad_options_for_the_batch(row, backend):
    _, options, error, words = row
    with pytest.raises(error, match=words):
        crl(*good(), backend, **options)


@pytest.mark.parametrize("options, error, words", [
    ({"weight": -1.0}, ValueError, "weight must be finite and >= 0"),
    ({"weight": "1"}, TypeError, "weight must be a float"),
    ({"alpha": 1.5}, ValueError, "alpha must be finite and >= 0.0 and <= 1.0"),
    ({"alpha": -0.1}, ValueError, "alpha must be finite"),
])
def test_bad_balanced_loss_options(options, error, words, backend):
    with pytest.raises(error, match=words):
        crl_ops.BalancedLoss(backend=backend, **options)


def test_other_entry_points_check_their_arguments(backend):
    features, logits, labels = good()
    with pytest.raises(ValueError, match="k must be between"):
        crl_ops.mine(features, logits, labels, k=0, backend=backend)
    with pytest.raises(ValueError, match="mode must be one of"):
        crl_ops.mine(features, logits, labels, mode="both", backend=backend)
    with pytest.raises(ValueError, match="num_classes has 2 entries"):
        crl_ops.profile_minority(labels, (2, 2), backend=backend)
    with pytest.raises(TypeError, match="num_classes must be an int or a sequence of ints"):
        crl_ops.profile_minority(labels, 2.5, backend=backend)
    with pytest.raises(TypeError, match=r"num_classes\[1\] must be an int"):
        crl_ops.profile_minority(labels, (2, 2.0, 2), backend=backend)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        crl_ops.profile_minority(labels, 1, backend=backend)
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = 5"):
        crl_ops.profile_minority(torch.full((4, 3), 5), 3, backend=backend)
    with pytest.raises(ValueError, match=r"labels\[5, 1\] = 2"):
        crl_ops.cross_entropy(logits, with_value(labels, (5, 1), 2))
    with pytest.raises(TypeError, match="validate must be True or False"):
        crl_ops.cross_entropy(logits, labels, validate="yes")


def test_class_balanced_accuracy_checks_the_layout():
    labels = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"preds must have the shape of labels \[4, 3\], got \[3, 4\]"):
        crl_ops.class_balanced_accuracy(labels.t().contiguous(), labels, 2)
    with pytest.raises(TypeError, match="preds must be an integer tensor"):
        crl_ops.class_balanced_accuracy(labels.float(), labels, 2)
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = 3"):
        crl_ops.class_balanced_accuracy(labels, with_value(labels, (0, 0), 3), 2)
    with pytest.raises(ValueError, match="preds and labels must be on one device"):
        crl_ops.class_balanced_accuracy(labels.to("meta"), labels, 2)
    assert crl_ops.class_balanced_accuracy(labels, labels, 2).mean.item() == 1.0


def test_torch_jit_script_says_what_to_use():
    with pytest.raises(TypeError, match="cannot be compiled with torch.jit.script.*torch.compile or torch.jit.trace"):
        torch.jit.script(crl_ops.CRL())


# ---- validate=False: one defined result on every backend ---------------------------------------------------


def _loss_and_grad(backend, mode, form, features, logits, labels, **options):
    f = features.clone().requires_grad_()
    loss = crl(f, logits, labels, backend, mode, form, validate=False, **options)
    return loss.detach(), torch.autograd.grad(loss, f)[0]


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_unchecked_out_of_range_labels_are_not_annotated(mode, form, backend):
    features, logits, labels = good()
    bad = labels.clone()
    bad[2, 0], bad[3, 1], bad[4, 2] = -2, 7, -100
    cleaned = bad.clone()
    cleaned[2, 0] = cleaned[3, 1] = cleaned[4, 2] = -1
    got = _loss_and_grad(backend, mode, form, features.double(), logits.double(), bad)
    want = _loss_and_grad("reference", mode, form, features.double(), logits.double(), cleaned)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode, form", VARIANTS)
@pytest.mark.parametrize("where", ["features-nan", "features-inf", "logits-nan", "features-overflow"])
def test_unchecked_non_finite_values_give_nan(where, mode, form, backend):
    features, logits, labels = good()
    if where == "features-nan":
        features[3, 1, 2] = math.nan
    elif where == "features-inf":
        features[0, 0, 0] = math.inf
    elif where == "logits-nan":
        logits[1, 0, 1] = math.nan
    else:
        features = features * 1e20
    loss, grad = _loss_and_grad(backend, mode, form, features, logits, labels)
    assert torch.isnan(loss) and torch.isnan(grad).all()


def test_nan_distances_take_histogram_node_zero(backend):
    # A NaN distance reaches the histogram only with validate=False; its node must be defined.
    features, logits, labels = good()
    features[:, 0] = math.nan
    loss, _ = _loss_and_grad(backend, "instance", "distribution", features, logits, labels)
    assert torch.isnan(loss)


# ---- regressions of the adversarial pass (issue #12) -------------------------------------------------------


@pytest.mark.parametrize("module", [crl_ops.CRL, crl_ops.BalancedLoss])
@pytest.mark.parametrize("form", FORMS)
def test_an_inference_mode_call_does_not_break_training(module, form, backend):
    features = torch.randn(16, 3, 4, requires_grad=True)
    logits = torch.randn(16, 3, 2)
    labels = torch.tensor([[0, 0, 0]] * 11 + [[1, 1, 1]] * 5)
    crl_ops._inputs._CONSTANTS.clear()  # as in a fresh process: the first call is the evaluation
    with torch.inference_mode():
        module(form=form, backend=backend)(features, logits, labels)
    loss = module(form=form, backend=backend)(features, logits, labels)
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_quantised_features_get_the_exact_histogram_gradient(backend):
    # Integer-valued features put distances exactly on histogram nodes; the float32 gradient must
    # follow the node rule of section 3 as the float64 oracle does.
    problem = make_problem(4, 40, (2, 3), 3, False, "list", skew=2.0, integer_features=True)
    features, logits, labels, canonical, _ = problem.inputs(torch.float32)
    got = torch.autograd.grad(crl(features, logits, labels, backend, "instance", "distribution", bins=100), features)[0]
    f64, lg64, lab = canonical()
    mined = oracle.mine(f64.detach(), [x.detach() for x in lg64], lab, "instance", 5)
    want = torch.autograd.grad(oracle.crl_loss(f64, mined, "distribution", [0.0, 0.0], bins=100), features)[0]
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_torch_func_grad(mode, form, backend):
    features, logits, labels = good()
    f = features.double()

    def loss_of(x):
        return crl_ops.class_rectification_loss(x, logits.double(), labels, mode=mode, form=form, backend=backend)

    got = torch.func.grad(loss_of)(f)
    x = f.clone().requires_grad_()
    want = torch.autograd.grad(loss_of(x), x)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_torch_func_vmap_with_validation(mode, form, backend):
    """vmap with the default validate=True: each batch element's loss, and a non-finite value or a
    bad label anywhere in the batch raises the error it raises outside vmap."""
    features, logits, labels = good()
    batch = torch.stack([features, 2 * features, features.flip(0)]).double()
    crl_fn = crl_ops.CRL(mode, form, backend=backend)
    got = torch.func.vmap(lambda x: crl_fn(x, logits.double(), labels))(batch)
    want = torch.stack([crl_fn(x, logits.double(), labels) for x in batch])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="features contain NaN or inf"):
        torch.func.vmap(lambda x: crl_fn(x, logits.double(), labels))(with_value(batch, (1, 3, 0, 0), math.nan))
    bad_labels = torch.stack([labels, with_value(labels, (2, 1), 5)])
    with pytest.raises(ValueError, match="out of range"):
        torch.func.vmap(lambda y: crl_fn(features, logits, y))(bad_labels)


def test_meta_tensors_give_the_loss_shape(backend):
    features, logits, labels = (t.to("meta") for t in good())
    loss = crl(features, logits, labels, backend)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32


def test_accepted_formats_agree(backend):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, A, dtype=torch.float64, generator=g)
    labels = (torch.rand(B, A, generator=g) < 0.3).long()
    shared = torch.randn(B, D, dtype=torch.float64, generator=g)
    per_attribute = shared[:, None].expand(B, A, D).clone()
    two_class = torch.stack([torch.zeros_like(z), z], -1)
    losses = [crl(shared, z, labels, backend), crl(per_attribute, z, labels, backend),
              crl(per_attribute, two_class, labels, backend),
              crl(per_attribute, list(two_class.unbind(1)), labels, backend)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])
    single = [crl(per_attribute[:, 0], two_class[:, 0], labels[:, 0], backend),
              crl(per_attribute[:, :1], z[:, :1], labels[:, :1], backend)]
    torch.testing.assert_close(single[0], single[1])


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(crl_ops._backends, "_native_for", lambda device_type: False)
    monkeypatch.setitem(crl_ops._native._UNAVAILABLE, "cpu", "no C++ compiler was found")
    monkeypatch.setattr(crl_ops._backends, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference on cpu.*no C\\+\\+ compiler"):
        crl(*good(), "auto")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler was found"):
        crl(*good(), "native")


@pytest.mark.parametrize("where", ["labels", "features"])
def test_compiled_code_still_checks_values(where, backend):
    features, logits, labels = good()
    if where == "labels":
        labels = with_value(labels, (2, 1), 5)
    else:
        features = with_value(features, (2, 1, 0), math.nan)
    torch._dynamo.reset()
    step = torch.compile(lambda f, lg, lb: crl(f, lg, lb, backend), backend="aot_eager", fullgraph=True)
    expected = ValueError if backend == "native" else RuntimeError  # torch._assert_async in the reference
    with pytest.raises(expected, match="labels|label|features contain NaN"):
        step(features, logits, labels)


def test_mine_needs_features(backend):
    _, logits, labels = good()
    with pytest.raises(TypeError, match="features must be a torch.Tensor, got NoneType"):
        crl_ops.mine(None, logits, labels, backend=backend)


@pytest.mark.parametrize("mode, form", VARIANTS)
def test_normalize_survives_huge_features(mode, form, backend):
    features, logits, labels = good()
    scaled = crl(features, logits, labels, backend, mode, form, normalize=True)
    huge = crl(features * 1e30, logits, labels, backend, mode, form, normalize=True)
    torch.testing.assert_close(huge, scaled)


@pytest.mark.parametrize("validate", [True, False])
def test_score_space_checks_the_features(validate, backend):
    features, logits, labels = good()
    features[2, 1, 0] = math.nan
    if validate:
        with pytest.raises(ValueError, match="features contain NaN or inf"):
            crl(features, logits, labels, backend, "class", "relative", distance="score")
    else:
        assert torch.isnan(crl(features, logits, labels, backend, "class", "relative", distance="score",
                               validate=False))
