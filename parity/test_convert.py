"""flaxres.convert: file formats users have, strict errors, the CLI, torch-free import."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import flaxres
from flaxres.convert import ConversionError, from_torch, main, to_torch
from parity.reference import create_torch_model


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return create_torch_model("resnet20")


def _same(model, ref) -> bool:
    back = to_torch(model)
    return all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("wrap", ["bare", "module.", "state_dict", "model", "nn.Module"])
def test_accepted_sources(ref, wrap, tmp_path):
    sd = ref.state_dict()
    source = {"bare": sd, "module.": {"module." + k: v for k, v in sd.items()},
              "state_dict": {"epoch": 3, "state_dict": sd}, "model": {"model": sd, "opt": {}},
              "nn.Module": ref}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(source if wrap != "nn.Module" else sd, path)
    for src in (source, path):
        assert _same(from_torch(flaxres.create_model("resnet20", seed=1), src), ref)


def test_registry_name_infers_num_classes():
    torch.manual_seed(0)
    ref = create_torch_model("resnet20", num_classes=100)
    model = from_torch("resnet20", ref.state_dict())
    assert model.fc.kernel.shape == (64, 100) and _same(model, ref)


def test_strict_lists_every_problem_in_one_error(ref):
    sd = dict(ref.state_dict())
    del sd["layer1.0.conv1.weight"], sd["bn1.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    sd["fc.weight"] = torch.zeros(5, 64)
    with pytest.raises(ConversionError) as e:
        from_torch(flaxres.create_model("resnet20"), sd)
    msg = str(e.value)
    for key in ("layer1.0.conv1.weight", "bn1.running_var", "extra.weight", "fc.weight: checkpoint (5, 64), model (10, 64)"):
        assert key in msg
    assert "num_batches_tracked" not in msg


def test_non_strict_skips_missing_but_not_misshaped(ref):
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    model = from_torch(flaxres.create_model("resnet20", seed=3), sd, strict=False)
    assert np.array_equal(np.asarray(model.conv1.kernel[...]).transpose(3, 2, 0, 1),
                          ref.conv1.weight.detach().numpy())
    with pytest.raises(ConversionError, match="mis-shaped"):
        from_torch(flaxres.create_model("resnet20"), {"fc.weight": torch.zeros(2, 2)}, strict=False)


def test_cli_round_trip(ref, tmp_path):
    src, back = tmp_path / "in.pth", tmp_path / "back.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, src)
    main(["--arch", "resnet20", str(src), str(tmp_path / "orbax")])
    main(["--arch", "resnet20", str(tmp_path / "orbax"), str(back)])
    loaded = torch.load(back, weights_only=True)
    fresh = create_torch_model("resnet20")
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    from safetensors.torch import load_file  # PyTorch reads the shipped format as it is

    main(["--arch", "resnet20", str(back), str(tmp_path / "w.safetensors")])
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ref.state_dict().items()
               if not k.endswith("num_batches_tracked"))


def test_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import flaxres, flaxres.convert; "
            "m = flaxres.create_model('resnet20'); print(len(flaxres.convert.named_arrays(m)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(create_torch_model("resnet20").state_dict()) - 19)
