"""Initial weights drawn as PyTorch draws them, layer by layer: torchvision's Kaiming-normal
(fan_out, ReLU gain) for every convolution, ``nn.Linear``'s default uniform for the head, ones
and zeros for BatchNorm. Each flaxres layer's mean and std must equal the PyTorch reference's
within sampling error, on nets with stride-2, projection, 7x7 and pre-activation convolutions, where
fan_in and fan_out differ (a swapped fan mode or gain moves their std by 1.4x or more)."""

import numpy as np
import pytest
import torch

import flaxres
from flaxres.convert import named_arrays
from parity.reference import create_torch_model

ARCHS = ("resnet20", "resnet164", "resnet18", "preact_resnet164")
Z_MAX = 5.0  # standard errors: over ~300 layers a true match exceeds this with p < 1e-4


def _z_scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """How many standard errors apart the two samples' means and stds are (the std's standard
    error taken as a normal sample's, σ/√(2n); a uniform's is smaller, so this is lenient)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    se_mean = np.sqrt(a.var() / a.size + b.var() / b.size)
    se_std = np.sqrt(a.var() / (2 * a.size) + b.var() / (2 * b.size))
    return abs(a.mean() - b.mean()) / se_mean, abs(a.std() - b.std()) / se_std


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_starts_as_pytorchs(arch):
    torch.manual_seed(0)
    ref = {k: v.numpy() for k, v in create_torch_model(arch).state_dict().items()}
    ours = named_arrays(flaxres.create_model(arch, num_classes=10, seed=0))
    assert set(ours) == {k for k in ref if not k.endswith("num_batches_tracked")}
    checked = 0
    for name, got in ours.items():
        want = ref[name]
        if got.ndim == 1 and not name.startswith("fc."):  # BatchNorm: ones and zeros
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        z_mean, z_std = _z_scores(got, want)
        assert z_mean < Z_MAX and z_std < Z_MAX, (name, got.shape, got.std(), want.std())
        checked += 1
    assert checked >= 20  # every conv and the head, not a lucky few


def test_the_head_is_nn_linears_uniform():
    """``U(-1/√fan_in, 1/√fan_in)`` for weight and bias: bounded and filling the interval."""
    model = flaxres.create_model("resnet56", seed=3)
    bound = 1 / np.sqrt(64)
    for p in (np.asarray(model.fc.kernel[...]), np.asarray(model.fc.bias[...])):
        assert np.abs(p).max() <= bound and np.abs(p).max() > 0.7 * bound


def test_seeds_decide_the_weights():
    k = flaxres.create_model("resnet20", seed=3).layer3[0].conv2.kernel[...]
    np.testing.assert_array_equal(flaxres.create_model("resnet20", seed=3)
                                  .layer3[0].conv2.kernel[...], k)
    assert not np.array_equal(flaxres.create_model("resnet20", seed=4)
                              .layer3[0].conv2.kernel[...], k)
