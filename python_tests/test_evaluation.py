"""The torch-fidelity digits path and FID's offline behaviour."""
import hashlib
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from varweight_kernels.evaluation import FIDEvaluator
from varweight_kernels.evaluation import fid as fid_mod
from varweight_kernels.evaluation import digits_classifier as dc


def _scipy_reference_fd(mu1, s1, mu2, s2):
    """The classic pytorch-fid formula with scipy.linalg.sqrtm (reference only)."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("varweight_cache")


def test_digits_classifier_deterministic_and_accurate(digits_cache):
    path = dc.ensure_classifier(cache_dir=digits_cache)
    model, acc = dc.load_classifier(path)
    assert acc > 0.93
    # the cached file is reused, not retrained
    mtime = path.stat().st_mtime_ns
    assert dc.ensure_classifier(cache_dir=digits_cache) == path and path.stat().st_mtime_ns == mtime


def test_digits_fd_through_torch_fidelity(digits_cache):
    torch.set_num_threads(1)
    ev = FIDEvaluator("digits", cache_dir=digits_cache, num_samples=500)
    xtr, _, xte, _ = dc.load_digits_split()
    real = ev.score(xte)
    assert set(real) == {"fd_digits", "fd_floor", "classifier_acc"}
    assert real["classifier_acc"] > 0.93
    assert real["fd_digits"] == pytest.approx(real["fd_floor"], rel=1e-6)  # test split vs train = the floor
    noise = ev.score(torch.randint(0, 256, (450, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))
    assert noise["fd_digits"] > 10 * real["fd_floor"]
    # the value equals the classic Frechet distance on the classifier's penultimate features
    model, _ = dc.load_classifier(dc.ensure_classifier(cache_dir=digits_cache))
    with torch.no_grad():
        fte = model.features(dc.preprocess(xte)).double().numpy()
        ftr = model.features(dc.preprocess(xtr)).double().numpy()
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (fte, ftr)]
    assert real["fd_floor"] == pytest.approx(_scipy_reference_fd(*stats[0], *stats[1]), rel=1e-3, abs=1e-4)
    # upsampled RGB versions of the same images score the same (area resize back to 8x8)
    big = xte.repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)
    assert ev.score(big)["fd_digits"] == pytest.approx(real["fd_digits"], rel=1e-5)


def test_fid_missing_inception_weights_warns_once_and_returns_none(monkeypatch, tmp_path):
    calls = []

    def no_network(dst, timeout=30.0):
        calls.append(dst)
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(fid_mod, "_download_inception", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ev = FIDEvaluator("cifar10", cache_dir=tmp_path)
    imgs = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert ev.score(imgs) is None
        assert ev.score(imgs) is None
        assert not ev.available()
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "--fid-weights PATH" in msgs[0]
    assert len(calls) == 1


def test_fid_weights_path_that_does_not_exist(tmp_path):
    ev = FIDEvaluator("cifar100", weights_path=tmp_path / "nope.pth", cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="--fid-weights"):
        assert ev.score(torch.zeros(4, 3, 32, 32, dtype=torch.uint8)) is None


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        FIDEvaluator("mnist")
    ev = FIDEvaluator("digits", cache_dir=tmp_path)
    with pytest.raises(TypeError):
        ev.score(torch.zeros(4, 1, 8, 8))


@pytest.fixture(scope="module")
def fake_inception_weights(tmp_path_factory):
    """A randomly initialised Inception state dict in torch-fidelity's format (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "fake-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_cifar_fid_path_offline_with_local_weights(fake_inception_weights, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    # the fake stands in for the published file: its digest is the one checked
    monkeypatch.setattr(fid_mod, "INCEPTION_SHA256", hashlib.sha256(fake_inception_weights.read_bytes()).hexdigest())
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    ev = FIDEvaluator("cifar10", weights_path=fake_inception_weights, cache_dir=tmp_path, reference_images=ref,
                      num_samples=4, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "unavailable" warning on this path
        same = ev.score(ref)
        other = ev.score(torch.full((4, 1, 32, 32), 128, dtype=torch.uint8))  # gray, 1 channel -> RGB
    assert set(same) == {"fid"} and ev.reference == "cifar10-train"
    assert abs(same["fid"]) < 1e-2 * max(1.0, other["fid"])
    assert np.isfinite(other["fid"]) and other["fid"] > same["fid"]
