"""flaxres.convert's weight layouts, checked on their own rather than by round trips (a layout
bug made in both directions cancels in a round trip): each conv, grouped conv and linear against
the explicit index map PyTorch[o, i, h, w] = flaxres[h, w, i, o] (linear: [o, i] = [i, o]) on
non-square shapes, both directions, and against PyTorch's own forward."""

import numpy as np
import pytest
import torch
from flax import nnx

from flaxres.convert import from_torch, to_torch


class Layers(nnx.Module):
    """One of each converted layer kind, named as the PyTorch module below."""

    def __init__(self, rngs: nnx.Rngs):
        # Cin != Cout and kh != kw everywhere, so no transposition can hide behind a square.
        self.conv = nnx.Conv(4, 6, (3, 5), strides=(2, 1), padding=((1, 1), (2, 2)), rngs=rngs)
        self.grouped = nnx.Conv(6, 9, (3, 1), padding=((1, 1), (0, 0)), feature_group_count=3,
                                use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(7, 5, rngs=rngs)


def torch_layers() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "conv": torch.nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)),
        "grouped": torch.nn.Conv2d(6, 9, (3, 1), padding=(1, 0), groups=3, bias=False),
        "fc": torch.nn.Linear(7, 5)})


def expected_conv(oihw: np.ndarray) -> np.ndarray:
    """flaxres's HWIO kernel of a PyTorch OIHW weight, element by element."""
    o, i, h, w = oihw.shape
    out = np.empty((h, w, i, o), oihw.dtype)
    for a, b, c, d in np.ndindex(o, i, h, w):
        out[c, d, b, a] = oihw[a, b, c, d]
    return out


def expected_linear(oi: np.ndarray) -> np.ndarray:
    return np.array([[oi[a, b] for a in range(oi.shape[0])] for b in range(oi.shape[1])])


@pytest.fixture(scope="module")
def pair():
    ref = torch_layers()
    return from_torch(Layers(nnx.Rngs(1)), ref.state_dict()), ref


def test_from_torch_layouts(pair):
    model, ref = pair
    for name in ("conv", "grouped"):
        w = getattr(ref, name).weight.detach().numpy()
        np.testing.assert_array_equal(np.asarray(getattr(model, name).kernel[...]),
                                      expected_conv(w))
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]),
                                  expected_linear(ref.fc.weight.detach().numpy()))
    np.testing.assert_array_equal(np.asarray(model.conv.bias[...]), ref.conv.bias.detach().numpy())
    np.testing.assert_array_equal(np.asarray(model.fc.bias[...]), ref.fc.bias.detach().numpy())


def test_to_torch_layouts():
    """From fresh flaxres weights (not from a PyTorch file), so the export is checked alone."""
    model = Layers(nnx.Rngs(2))
    sd = to_torch(model)
    for name in ("conv", "grouped"):
        np.testing.assert_array_equal(expected_conv(sd[f"{name}.weight"].numpy()),
                                      np.asarray(getattr(model, name).kernel[...]))
    np.testing.assert_array_equal(expected_linear(sd["fc.weight"].numpy()),
                                  np.asarray(model.fc.kernel[...]))
    torch_layers().load_state_dict(sd, strict=True)


def test_forward_equals_pytorch(pair):
    model, ref = pair
    x = np.random.default_rng(0).standard_normal((2, 4, 7, 6)).astype(np.float32)  # NCHW, H != W
    with torch.no_grad():
        t = ref.grouped(ref.conv(torch.from_numpy(x)))
    j = model.grouped(model.conv(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(j), t.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                               atol=1e-5)
    v = np.random.default_rng(1).standard_normal((3, 7)).astype(np.float32)
    with torch.no_grad():
        t_fc = ref.fc(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(np.asarray(model.fc(v)), t_fc, rtol=1e-5, atol=1e-6)
