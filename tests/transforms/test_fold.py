"""fold_batchnorm (chip-model.md section 6): folded models compute what the originals did.

The invariant behind every test: after folding, the eval-mode output equals the original's
(float32 tolerance, or ~1e-12 in float64 where the check is about the formula), exactly
the foldable BNs are gone, and every BN left in place is reported with its reason. A fold
that is not safe must be refused, never applied: a wrong fold changes outputs silently.
"""

import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from zoo import FOLDABLE, UNFOLDABLE, ZOO, randomise_bn

import torchlns
from torchlns.transforms.fold import FoldEntry, TorchLNSFoldWarning

_BN = nn.modules.batchnorm._BatchNorm


def _fold(model, **kw):
    """Fold, returning (folded, the TorchLNSFoldWarnings raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = torchlns.fold_batchnorm(model, **kw)
    return folded, [w for w in caught if issubclass(w.category, TorchLNSFoldWarning)]


def _assert_same_output(out, ref, rtol=1e-5):
    # atol scaled to the output, so that near-zero entries do not need a relative match
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def _bn_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, _BN)}


def _entry(report, bn) -> FoldEntry:
    (e,) = [e for e in report.entries if e.bn == bn]
    return e


def _stats(bn):
    # random running stats and affine parameters, so that a fold has real work to do
    return randomise_bn(bn, seed=bn.num_features)


# ----------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_output_and_folded_set(name):
    model, x = ZOO[name]()
    with torch.no_grad():
        ref = model(x)
    folded, warns = _fold(model)
    report = folded.fold_report

    # only the untraceable model falls back (and says so)
    assert bool(warns) == (name == "dynamic")
    assert report.traced == (name != "dynamic")
    with torch.no_grad():
        _assert_same_output(folded(x), ref)

    # exactly the FOLDABLE BNs are gone, and reported as folded
    assert sorted(e.bn for e in report.folded) == sorted(FOLDABLE[name])
    for bn in FOLDABLE[name]:
        assert isinstance(folded.get_submodule(bn), nn.Identity)  # Linear+BN1d: a rank guard
        assert isinstance(folded.get_submodule(_entry(report, bn).producer), torchlns.transforms.fold._PRODUCERS)
    assert _bn_names(folded) == _bn_names(model) - set(FOLDABLE[name])

    # what is left in place is still the same BN, untouched, with a reason naming the cause
    for bn, word in UNFOLDABLE.get(name, {}).items():
        e = _entry(report, bn)
        assert not e.folded and word in e.reason
        assert type(folded.get_submodule(bn)) is type(model.get_submodule(bn))
    assert all(e.reason for e in report.skipped)

    # every module a fold did not touch keeps its state (no collateral rescaling)
    touched = {e.bn for e in report.folded} | {e.producer for e in report.folded}
    for n, m in model.named_modules():
        if n not in touched and not list(m.children()):
            after = folded.get_submodule(n).state_dict()
            assert all(torch.equal(v, after[k]) for k, v in m.state_dict().items()), n


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_report_mentions_every_bn(name):
    model, _ = ZOO[name]()
    report = _fold(model)[0].fold_report
    # each BN of the original model appears exactly once
    assert sorted(e.bn for e in report.entries) == sorted(_bn_names(model))
    text = str(report)
    assert f"{len(report.folded)} folded, {len(report.skipped)} left in place" in text
    assert all(bn in text for bn in _bn_names(model))
    dicts = report.to_dicts()
    assert [d["bn"] for d in dicts] == [e.bn for e in report.entries]
    assert all(set(d) == {"bn", "producer", "folded", "reason"} for d in dicts)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_original_untouched(name):
    model, _ = ZOO[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bns = _bn_names(model)
    folded, _ = _fold(model)
    assert folded is not model
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _bn_names(model) == bns
    assert not hasattr(model, "fold_report")


def test_inplace_modifies_and_returns_same_object():
    model, x = ZOO["resnet"]()
    with torch.no_grad():
        ref = model(x)
    folded, _ = _fold(model, inplace=True)
    assert folded is model
    assert model.fold_report is folded.fold_report
    assert not _bn_names(model)  # resnet: every BN folds
    with torch.no_grad():
        _assert_same_output(model(x), ref)


def test_keeps_class_and_methods():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = _stats(nn.BatchNorm2d(6))
            self.head = nn.Linear(6, 2)

        def features(self, x):
            return F.relu(self.bn(self.conv(x)))

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    folded, _ = _fold(model)
    # a GraphModule would lose `features` and the user's forward code
    assert type(folded) is Net and not isinstance(folded, torch.fx.GraphModule)
    assert [e.bn for e in folded.fold_report.folded] == ["bn"]
    with torch.no_grad():
        _assert_same_output(folded.features(x), model.features(x))
        _assert_same_output(folded(x), model(x))


# ----------------------------------------------------------------------------------------
# the formula, in float64
# ----------------------------------------------------------------------------------------
def _check_pair_f64(producer, bn, x):
    """Fold Sequential(producer, bn) in float64 and compare with the unfused composition."""
    model = nn.Sequential(producer, _stats(bn)).double().eval()
    x = x.double()
    with torch.no_grad():
        ref = model(x)
    folded, _ = _fold(model)
    assert [e.bn for e in folded.fold_report.folded] == ["1"]
    assert isinstance(folded[1], nn.Identity)
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-12, atol=1e-12)
    return folded


# Grouped ConvTranspose: the weight is (in, out/groups, *k), so the per-output-channel scale
# does not lie along dim 0 or dim 1 of the weight; torch.nn.utils.fusion.fuse_conv_bn_eval
# gets this wrong (it raises a shape error for groups > 1 in torch 2.13).
CONV_T = {
    "1d": (nn.ConvTranspose1d, nn.BatchNorm1d, (2, 6, 7)),
    "2d": (nn.ConvTranspose2d, nn.BatchNorm2d, (2, 6, 5, 5)),
    "3d": (nn.ConvTranspose3d, nn.BatchNorm3d, (2, 6, 3, 3, 3)),
}


@pytest.mark.parametrize("dim", sorted(CONV_T))
@pytest.mark.parametrize("groups,cout", [(2, 4), (3, 9), (6, 6), (1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_grouped(dim, groups, cout, bias):
    conv, bn, shape = CONV_T[dim]
    # in/groups != out/groups in most cases, so a transposed (in, out) mix-up shows
    producer = conv(6, cout, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias)
    _check_pair_f64(producer, bn(cout), torch.randn(shape))


def test_conv_transpose_agrees_with_torch_ungrouped():
    # Where torch's helper is right (groups=1), the folded weights are the same as its own.
    ct = nn.ConvTranspose2d(4, 6, 3, stride=2)
    bn = _stats(nn.BatchNorm2d(6))
    model = nn.Sequential(ct, bn).double().eval()
    ref = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1], transpose=True)
    folded, _ = _fold(model)
    torch.testing.assert_close(folded[0].weight, ref.weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(folded[0].bias, ref.bias, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("conv,bn,shape", [
    (nn.Conv1d, nn.BatchNorm1d, (2, 4, 9)),
    (nn.Conv2d, nn.BatchNorm2d, (2, 4, 6, 6)),
    (nn.Conv3d, nn.BatchNorm3d, (2, 4, 4, 4, 4)),
])
def test_conv_grouped_dilated(conv, bn, shape):
    _check_pair_f64(conv(4, 8, 3, padding=2, dilation=2, groups=2), bn(8), torch.randn(shape))


def test_conv_without_bias_bn_without_affine():
    folded = _check_pair_f64(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5, affine=False), torch.randn(2, 3, 6, 6))
    # the BN's shift needs somewhere to go: a bias Parameter is created, in the model's dtype
    b = folded[0].bias
    assert isinstance(b, nn.Parameter) and b.shape == (5,) and b.dtype == torch.float64
    assert "0.bias" in dict(folded.named_parameters())


def test_linear_bn1d():
    _check_pair_f64(nn.Linear(7, 5), nn.BatchNorm1d(5), torch.randn(4, 7))
    _check_pair_f64(nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5), torch.randn(4, 7))


def test_linear_on_3d_input_bn1d_normalises_another_dim():
    # On a (N, L, F) input a Linear scales F, while BatchNorm1d normalises dim 1 (L). With
    # L == F the original runs, so folding blind would apply the BN to the wrong axis.
    model = nn.Sequential(nn.Linear(4, 8), _stats(nn.BatchNorm1d(8))).eval()
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        ref = model(x)
    # Without shapes the fold leaves a guard that refuses the rank it cannot be exact for ...
    folded, _ = _fold(model)
    with pytest.raises(RuntimeError, match="2-D"), torch.no_grad():
        folded(x)
    with torch.no_grad():  # ... and still serves 2-D input exactly
        x2 = torch.randn(5, 4)
        _assert_same_output(folded(x2), model(x2))
    # With example inputs the pass sees the 3-D output and keeps the BN.
    kept = torchlns.fold_batchnorm(model, example_inputs=(x,))
    assert isinstance(kept[1], nn.BatchNorm1d)
    assert "3-D" in kept.fold_report.skipped[0].reason
    with torch.no_grad():
        _assert_same_output(kept(x), ref)
    folded2 = torchlns.fold_batchnorm(model, example_inputs=(torch.randn(5, 4),))
    assert type(folded2[1]) is nn.Identity


# ----------------------------------------------------------------------------------------
# what must not fold
# ----------------------------------------------------------------------------------------
def _check_kept(model, x, bn, *words, producer=...):
    """Fold; ``bn`` must be left in place with every word in its reason, outputs unchanged."""
    with torch.no_grad():
        ref = model(x)
    folded, _ = _fold(model)
    e = _entry(folded.fold_report, bn)
    assert not e.folded and all(w in e.reason for w in words), e.reason
    if producer is not ...:
        assert e.producer == producer
    assert type(folded.get_submodule(bn)) is type(model.get_submodule(bn))
    with torch.no_grad():
        _assert_same_output(folded(x), ref)
    return folded


def test_bn2d_after_linear_not_folded():
    # Linear on the last dim of (N, C, H, W): BatchNorm2d normalises C, not the Linear's outputs
    model = nn.Sequential(nn.Linear(5, 6), _stats(nn.BatchNorm2d(3)))
    _check_kept(model.eval(), torch.randn(2, 3, 4, 5), "1", "BatchNorm2d", "Linear", "match", producer="0")


def test_bn_feature_count_mismatch_not_folded():
    # never run (it would fail): the analysis alone must refuse 4 channels into a 5-feature BN
    model = nn.Sequential(nn.Conv1d(3, 4, 1), _stats(nn.BatchNorm1d(5))).eval()
    folded, _ = _fold(model)
    e = _entry(folded.fold_report, "1")
    assert not e.folded and "features" in e.reason
    assert isinstance(folded[1], nn.BatchNorm1d)


def test_training_mode_not_folded():
    model, _ = ZOO["resnet"]()
    model.train()
    folded, _ = _fold(model)
    report = folded.fold_report
    assert not report.folded and len(report.skipped) == len(FOLDABLE["resnet"])
    for e in report.entries:
        assert "training" in e.reason and "eval" in e.reason
    assert _bn_names(folded) == _bn_names(model)
    assert folded.training  # folding does not flip the mode


def test_single_bn_in_training_mode_not_folded():
    model, x = ZOO["mobilenet"]()
    model.dw_bn.train()  # a train-mode BN inside an eval model normalises with batch stats
    with torch.no_grad():
        ref = model(x)
    folded, _ = _fold(model)
    e = _entry(folded.fold_report, "dw_bn")
    assert not e.folded and "training" in e.reason
    assert sorted(e.bn for e in folded.fold_report.folded) == sorted(set(FOLDABLE["mobilenet"]) - {"dw_bn"})
    with torch.no_grad():
        _assert_same_output(folded(x), ref)


class _BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _stats(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_bn_called_twice():
    # folding into `a` would make the Identity wrong for the call that follows `b`
    _check_kept(_BNTwice().eval(), torch.randn(2, 3, 5, 5), "bn", "places")


class _AliasedProducer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alias = self.conv  # same module, second name: fx sees only one of them
        self.bn = _stats(nn.BatchNorm2d(4))
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.other(self.bn(self.conv(x)))


class _AliasedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _stats(nn.BatchNorm2d(4))
        self.bn_again = self.bn

    def forward(self, x):
        return self.bn(self.conv(x))


def test_aliased_producer_not_folded():
    model = _AliasedProducer().eval()
    folded = _check_kept(model, torch.randn(2, 3, 5, 5), "bn", "several names", "conv", "alias")
    assert folded.conv is folded.alias  # deepcopy keeps the aliasing, and nothing rescaled it
    assert torch.equal(folded.conv.weight, model.conv.weight)


def test_aliased_bn_not_folded():
    _check_kept(_AliasedBN().eval(), torch.randn(2, 3, 5, 5), "bn", "several names")


class _BNOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = _stats(nn.BatchNorm2d(3))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.bn(x))


def test_bn_fed_by_model_input():
    _check_kept(_BNOnInput().eval(), torch.randn(2, 3, 4, 4), "bn", "input", producer=None)


class _SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.bn = _stats(nn.BatchNorm1d(6))
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight  # tied weights: rescaling `a` rescales `b`

    def forward(self, x):
        return self.b(F.relu(self.bn(self.a(x))))


class _WeightUsedDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = _stats(nn.BatchNorm1d(6))

    def forward(self, x):
        # the producer's weight has a second use that is not a call of the producer
        return self.bn(self.fc(x)) + F.linear(x, self.fc.weight)


@pytest.mark.parametrize("model_cls, word", [(_SharedWeight, "shared"), (_WeightUsedDirectly, "outside its call")])
def test_producer_weights_with_another_use_are_not_rescaled(model_cls, word):
    # Tied weights, or a weight read directly by forward: rescaling it in place for the fold
    # would change that other use too, so the BN must stay.
    model = model_cls().eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        ref = model(x)
    folded, _ = _fold(model)
    assert isinstance(folded.bn, nn.BatchNorm1d)
    assert word in folded.fold_report.skipped[0].reason
    with torch.no_grad():
        _assert_same_output(folded(x), ref)


# ----------------------------------------------------------------------------------------
# the torch.fx fallback
# ----------------------------------------------------------------------------------------
def test_dynamic_falls_back_with_warning():
    model, x = ZOO["dynamic"]()
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(TorchLNSFoldWarning, match="could not trace"):
        folded = torchlns.fold_batchnorm(model)
    report = folded.fold_report
    assert report.traced is False and "Dynamic" in report.fallback_reason
    assert "fallback" in str(report)
    assert sorted(e.bn for e in report.folded) == ["body.1", "body.4"]
    assert [e.producer for e in sorted(report.folded, key=lambda e: e.bn)] == ["body.0", "body.3"]
    assert type(folded.body[1]) is nn.Identity and type(folded.body[4]) is nn.Identity
    with torch.no_grad():
        _assert_same_output(folded(x), ref)


class _Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # data-dependent: the Sequential holding it won't trace


class _UntraceableSeq(nn.Module):
    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(4, 4, 1)
        self.seq = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), _stats(nn.BatchNorm2d(4)), nn.ReLU(), _Gate(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), _stats(nn.BatchNorm2d(4)), _Gate(),
            conv, _stats(nn.BatchNorm2d(4)), conv,  # `conv` twice: folding `8` into it would be wrong
            _stats(nn.BatchNorm2d(4)),  # after the second `conv` call
        )

    def forward(self, x):
        return self.seq(x)


def test_untraceable_sequential_folds_adjacent_pairs():
    model = _UntraceableSeq().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(TorchLNSFoldWarning):
        folded = torchlns.fold_batchnorm(model)
    report = folded.fold_report
    assert report.traced is False
    assert sorted(e.bn for e in report.folded) == ["seq.1", "seq.5"]
    assert "several names" in _entry(report, "seq.8").reason
    assert not _entry(report, "seq.10").folded
    for bn in ("seq.8", "seq.10"):
        assert isinstance(folded.get_submodule(bn), nn.BatchNorm2d)
    with torch.no_grad():
        _assert_same_output(folded(x), ref)


def test_untraceable_sequential_shared_activation_between_pair():
    # Sequential.named_children() lists a module registered twice only once: pairing its
    # children would drop the shared ReLU at index 4 and make conv `3` and BN `5` look
    # adjacent although the ReLU runs between them. The fallback walks every slot instead.
    act = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, _Gate(),
                          nn.Conv2d(4, 4, 3, padding=1), act, _stats(nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(TorchLNSFoldWarning):
        folded = torchlns.fold_batchnorm(model)
    with torch.no_grad():
        _assert_same_output(folded(x), ref)


# ----------------------------------------------------------------------------------------
# dtype, idempotence, arguments
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "unet", "transpose3d"])
def test_dtype_device_preserved(name):
    model, _ = ZOO[name]()
    device = next(model.parameters()).device
    folded, _ = _fold(model)
    # the fold computes in float64; what it writes back (created biases too) is float32
    for n, p in folded.named_parameters():
        assert p.dtype == torch.float32 and p.device == device, n


def test_double_model_stays_double():
    model, x = ZOO["mobilenet"]()
    model = model.double()
    folded, _ = _fold(model)
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x.double()), model(x.double()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["awkward", "dynamic"])
def test_fold_twice_is_idempotent(name):
    model, x = ZOO[name]()
    once, _ = _fold(model)
    twice, _ = _fold(once)
    assert not twice.fold_report.folded
    # the BNs the first pass kept are kept again, for the same reason
    assert twice.fold_report.skipped == once.fold_report.skipped
    assert all(torch.equal(v, twice.state_dict()[k]) for k, v in once.state_dict().items())
    with torch.no_grad():
        assert torch.equal(twice(x), once(x))


@pytest.mark.parametrize("bad", [None, torch.randn(3), lambda x: x, [nn.Conv2d(1, 1, 1)]])
def test_not_a_module_raises_type_error(bad):
    with pytest.raises(TypeError, match="nn.Module"):
        torchlns.fold_batchnorm(bad)


def test_bn_state_read_outside_its_call_is_kept():
    # forward reads bn.running_mean directly: replacing the BN by Identity would break it.
    class ReadsStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.bn = _stats(nn.BatchNorm1d(6))

        def forward(self, x):
            return self.bn(self.fc(x)) - self.bn.running_mean

    model = ReadsStats().eval()
    x = torch.randn(3, 6)
    folded = torchlns.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm1d)
    assert "outside its call" in folded.fold_report.skipped[0].reason
    with torch.no_grad():
        _assert_same_output(folded(x), model(x))
