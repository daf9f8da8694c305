"""Weights people already have: akamaster / kuangliu / torchvision checkpoints as those repositories
save them, safetensors, Orbax directories and URLs through ``create_model(pretrained=...)``, and
one clear error for every kind of bad input, with nothing left half-written in the cache."""

import functools
import hashlib
import http.server
import logging
import re
import socket
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

import flaxres
from flaxres.convert import ConversionError, WeightsError, from_torch
from parity.reference import create_torch_model

# ----------------------------------------------------------------------------- the repositories' nets
# Module names exactly as in akamaster/pytorch_resnet_cifar10 (resnet.py) and
# kuangliu/pytorch-cifar (models/resnet.py), so their state dicts have those files' keys.


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class AkaBlock(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:  # option A
            self.shortcut = _Lambda(lambda x: F.pad(x[:, :, ::2, ::2],
                                                    (0, 0, 0, 0, planes // 4, planes // 4)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class AkaResNet(nn.Module):
    def __init__(self, n=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(AkaBlock(cin, planes, 2 if i and not j else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.avg_pool2d(out, out.size()[3]).flatten(1))


class KuangBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class KuangResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for stride in [1 if i == 0 else 2] + [1] * (n - 1):
                blocks.append(KuangBlock(cin, planes, stride))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


class KuangPreActBlock(nn.Module):
    """kuangliu/pytorch-cifar's models/preact_resnet.py ``PreActBlock``, as written there."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, self.expansion * planes,
                                                    kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class KuangPreActResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        layers = []
        for s in [stride, 1]:
            layers.append(KuangPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.avg_pool2d(out, 4).view(out.size(0), -1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a mix-up of any of them shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@functools.cache
def akamaster() -> AkaResNet:
    torch.manual_seed(0)
    return _randomise_bn(AkaResNet())


@functools.cache
def kuangliu() -> KuangResNet:
    torch.manual_seed(0)
    return _randomise_bn(KuangResNet(num_classes=100))


def _dp(sd: dict) -> dict:
    """The keys of a model saved while wrapped in nn.DataParallel."""
    return {"module." + k: v for k, v in sd.items()}


@nnx.jit  # one compile per architecture, not one per eager op or per test
def _forward(model, x):
    return model(x)


def _assert_same_logits(model, ref: nn.Module, size: int = 32) -> None:
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = _forward(model, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- layouts as saved


def test_akamaster_checkpoint_as_published(tmp_path):
    """{'state_dict': DataParallel keys, 'best_prec1': ...}, linear head, option-A shortcuts."""
    path = tmp_path / "resnet20-12fca82f.th"  # published in 2018: torch.save's legacy format
    torch.save({"state_dict": _dp(akamaster().state_dict()), "best_prec1": 91.73}, path,
               _use_new_zipfile_serialization=False)
    model = from_torch("resnet20", path)
    assert model.fc.kernel.shape == (64, 10)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(model)))  # none abstract
    _assert_same_logits(model, akamaster())


def test_kuangliu_checkpoint_as_saved(tmp_path):
    """{'net': DataParallel keys, 'acc', 'epoch'}, shortcut.0/.1 projections, linear head;
    num_classes (100) comes from that head."""
    path = tmp_path / "ckpt.pth"
    torch.save({"net": _dp(kuangliu().state_dict()), "acc": 95.2, "epoch": 199}, path)
    model = flaxres.create_model("resnet18_cifar", pretrained=path)
    assert model.fc.kernel.shape == (512, 100)
    _assert_same_logits(model, kuangliu())


def test_kuangliu_preact_resnet18_as_saved(tmp_path):
    """kuangliu's PreActResNet18 checkpoint ({'net': DataParallel keys}): pre-activation blocks,
    bare-conv ``shortcut.0`` projections, no final BatchNorm, ``linear`` head."""
    torch.manual_seed(0)
    ref = _randomise_bn(KuangPreActResNet18())
    torch.save({"net": _dp(ref.state_dict()), "acc": 94.7, "epoch": 199}, tmp_path / "ckpt.pth")
    model = flaxres.create_model("preact_resnet18", pretrained=tmp_path / "ckpt.pth")
    assert flaxres.count_params(model) == sum(p.numel() for p in ref.parameters()) == 11_171_146
    _assert_same_logits(model, ref)


@pytest.mark.parametrize("name", [
    "wide_resnet50_2",
    pytest.param("wide_resnet101_2", marks=pytest.mark.full),
    pytest.param("resnext101_64x4d", marks=pytest.mark.full)])
def test_torchvision_builders_state_dicts_as_saved(name, tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = _randomise_bn(getattr(torchvision.models, name)())
    torch.save(ref.state_dict(), tmp_path / f"{name}.pth")
    model = flaxres.create_model(name, pretrained=tmp_path / f"{name}.pth")
    _assert_same_logits(model, ref, size=64)


def test_torchvision_layout_with_compile_and_dataparallel_prefixes(tmp_path):
    torch.manual_seed(0)
    ref = _randomise_bn(create_torch_model("resnet20"))
    path = tmp_path / "r20.pt"
    torch.save({"model": _dp({"_orig_mod." + k: v for k, v in ref.state_dict().items()}),
                "optimizer": {"lr": 0.1}, "epoch": 3}, path)
    _assert_same_logits(flaxres.create_model("resnet20", pretrained=path), ref)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(akamaster().state_dict(), path)
    _assert_same_logits(flaxres.create_model("resnet20", pretrained=path), akamaster())


# A hand-written module, as tutorials write them, may take each name from another repository:
# (head, projection shortcut) as its attributes call them.
MIXED = (("fc", "shortcut"), ("linear", "downsample"))
WRAPPERS = (lambda sd: {"net": _dp(sd)}, lambda sd: {"state_dict": sd},
            lambda sd: {"model": _dp(sd), "epoch": 3}, lambda sd: sd)
HAND_WRITTEN_DEFAULT = ("resnet20", "plain20", "resnet164", "resnet18_cifar", "preact_resnet18")


def _hand_written(sd: dict, head: str, shortcut: str) -> dict:
    """``sd`` (torchvision's names) as saved from a module with these attribute names."""
    return {re.sub(r"^(layer\d+\.\d+\.)downsample\.", rf"\1{shortcut}.",
                   re.sub(r"^fc\.", f"{head}.", k)): v for k, v in sd.items()}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in HAND_WRITTEN_DEFAULT
                                               else pytest.mark.full)
                                  for a in flaxres.list_models()])
def test_every_architecture_loads_a_hand_written_module_that_mixes_conventions(arch, tmp_path):
    i = flaxres.list_models().index(arch)
    torch.manual_seed(i)
    ref = _randomise_bn(create_torch_model(arch, num_classes=7))
    head, shortcut = MIXED[i % len(MIXED)]
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPERS[i % len(WRAPPERS)](_hand_written(ref.state_dict(), head, shortcut)), path)
    model = flaxres.create_model(arch, pretrained=path)
    assert model.fc.kernel.shape[-1] == 7
    _assert_same_logits(model, ref, size=64 if flaxres.model_stem(arch) == "imagenet" else 32)


def test_aliases_of_one_parameter_and_wrappers_are_ambiguous():
    sd = dict(akamaster().state_dict())
    sd["fc.weight"] = sd["linear.weight"]
    with pytest.raises(WeightsError, match="ambiguous state dict: 'fc.weight' and "
                                           "'linear.weight' are aliases of one parameter"):
        from_torch("resnet20", sd)
    sd = dict(kuangliu().state_dict())
    sd["layer2.0.downsample.0.weight"] = sd["layer2.0.shortcut.0.weight"]
    with pytest.raises(WeightsError, match="'layer2.0.downsample.0.weight' and "
                                           "'layer2.0.shortcut.0.weight' are aliases"):
        from_torch("resnet18_cifar", sd)
    with pytest.raises(WeightsError, match="ambiguous checkpoint: state dicts under 'state_dict', 'net'"):
        from_torch("resnet20", {"state_dict": akamaster().state_dict(),
                                "net": akamaster().state_dict()})


def test_loaded_weights_do_not_follow_the_torch_module_they_came_from():
    ref = create_torch_model("resnet20")
    model = from_torch("resnet20", ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(1.0)
    assert float(model.bn1.scale[0]) == 1.0 and float(model.fc.bias[0]) != float(ref.fc.bias[0])


def test_partial_match_lists_every_problem():
    sd = _dp(kuangliu().state_dict())
    del sd["module.layer2.0.shortcut.1.running_var"]
    sd["module.layer9.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        from_torch("resnet18_cifar", {"net": sd})
    msg = str(e.value)
    assert "(kuangliu layout, 2-2-2-2-0-0-0-0-1 blocks per stage) does not fit resnet18_cifar" in msg
    assert "1 missing: layer2.0.shortcut.1.running_var" in msg  # the file's names
    assert "1 unexpected: layer9.0.conv1.weight" in msg


# ----------------------------------------------------------------------------- create_model sources


def test_other_num_classes_gives_a_fresh_head_and_says_so(tmp_path, caplog):
    path = tmp_path / "aka.th"
    torch.save({"state_dict": akamaster().state_dict()}, path)
    with caplog.at_level(logging.WARNING, logger="flaxres"):
        model = flaxres.create_model("resnet20", pretrained=path, num_classes=100, seed=3)
    assert "fresh 100-class head" in caplog.text and "10 classes" in caplog.text
    fresh = flaxres.create_model("resnet20", num_classes=100, seed=3)
    np.testing.assert_array_equal(model.fc.kernel[...], fresh.fc.kernel[...])
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]).transpose(3, 2, 0, 1),
                                  akamaster().conv1.weight.detach().numpy())


def _train_cifar_checkpoint(root: Path, arch: str = "resnet20", mesh=None) -> Path:
    """A ``<workdir>/checkpoints/best/<step>`` exactly as train.cifar writes it (replicated over
    ``mesh``'s devices if given)."""
    from flaxres import checkpoint
    from train import optim, steps

    model = from_torch(arch, akamaster().state_dict())
    _, _, state = steps.init_state(model, optim.sgd(0.1), 0)
    tree = {"state": state, "metrics": steps.zero_metrics()}
    if mesh is not None:
        tree = jax.device_put(tree, steps.replicated(mesh))
    checkpoint.save(root / "checkpoints" / "best", 7, tree, {"epoch": 1, "config": {"arch": arch}})
    return root


def test_orbax_workdir_of_train_cifar(tmp_path):
    wd = _train_cifar_checkpoint(tmp_path / "run")
    for src in (wd, wd / "checkpoints" / "best", wd / "checkpoints" / "best" / "7"):
        _assert_same_logits(flaxres.create_model("resnet20", pretrained=src), akamaster())
    with pytest.raises(WeightsError, match="holds a resnet20, not a resnet32"):
        flaxres.create_model("resnet32", pretrained=wd)


@pytest.mark.full
def test_orbax_checkpoint_saved_on_another_mesh(tmp_path):
    """A train.cifar checkpoint saved replicated over 4 devices loads on this 1-device process."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; sys.path.insert(0, '.'); "
            "import tests.test_pretrained as t, jax; from train import steps; "
            "assert len(jax.devices()) == 4; "
            "t._train_cifar_checkpoint(Path(sys.argv[1]), mesh=steps.make_mesh())")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1], timeout=300)
    _assert_same_logits(flaxres.create_model("resnet20", pretrained=tmp_path / "run"), akamaster())


def test_orbax_directory_of_the_convert_cli(tmp_path):
    from flaxres.convert import main

    src = tmp_path / "aka.th"
    torch.save({"state_dict": _dp(akamaster().state_dict()), "best_prec1": 90.0}, src)
    main(["--arch", "resnet20", str(src), str(tmp_path / "orbax")])
    _assert_same_logits(flaxres.create_model("resnet20", pretrained=tmp_path / "orbax"),
                        akamaster())
    with pytest.raises(ConversionError, match="does not fit resnet18_cifar"):
        flaxres.create_model("resnet18_cifar", pretrained=tmp_path / "orbax")


# ----------------------------------------------------------------------------- URLs


class _Server:
    """A file server on 127.0.0.1 in a thread, counting the requests it answers."""

    def __init__(self, root: Path):
        outer = self
        self.requests = 0

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                outer.requests += 1
                if self.path == "/cut-short.pth":  # the connection drops mid-file
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"PK\x03\x04" + bytes(96))
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "srv").mkdir()
    torch.save({"state_dict": _dp(akamaster().state_dict()), "best_prec1": 91.7},
               tmp_path / "srv" / "resnet20-12fca82f.th")
    s = _Server(tmp_path / "srv")
    yield s
    s.close()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_url_is_downloaded_once_and_checked(server, tmp_path):
    cache = tmp_path / "cache"
    url = server.url + "/resnet20-12fca82f.th"
    digest = hashlib.sha256((tmp_path / "srv" / "resnet20-12fca82f.th").read_bytes()).hexdigest()
    for _ in range(2):
        model = flaxres.create_model("resnet20", pretrained=url, cache_dir=cache, sha256=digest)
    assert server.requests == 1
    assert [p.name for p in _files(cache)] == ["resnet20-12fca82f.th"]
    _assert_same_logits(model, akamaster())
    file_url = (tmp_path / "srv" / "resnet20-12fca82f.th").as_uri()
    _assert_same_logits(flaxres.create_model("resnet20", pretrained=file_url, cache_dir=cache),
                        akamaster())


def test_failing_urls_leave_nothing_in_the_cache(server, tmp_path):
    cache = tmp_path / "cache"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/w.pth"
    cases = {server.url + "/missing.pth": "download failed: HTTP Error 404",
             refused: "download failed: .*Connection refused",
             server.url + "/cut-short.pth": "download failed: .*(100 of 100000 bytes|IncompleteRead)",
             server.url + "/resnet20-12fca82f.th": "sha256 mismatch: expected 00+, downloaded"}
    for url, match in cases.items():
        with pytest.raises(WeightsError, match=match) as e:
            flaxres.create_model("resnet20", pretrained=url, cache_dir=cache, sha256="0" * 64)
        assert str(e.value).startswith(url) and "\n" not in str(e.value)
        assert _files(cache) == []


# ----------------------------------------------------------------------------- bad files


def test_bad_files_give_one_clear_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": akamaster().state_dict()}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    (tmp_path / "empty.th").write_bytes(b"")
    from safetensors.torch import save_file

    save_file(akamaster().state_dict(), tmp_path / "w.safetensors")
    st = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) - 100])
    (tmp_path / "empty_dir").mkdir()
    cases = {
        "truncated.pth": "not a readable PyTorch checkpoint",
        "notes.pth": "not a checkpoint: expected a PyTorch file",
        "empty.th": r"not a checkpoint.*\(the file is empty\)",
        "truncated.safetensors": "not a readable safetensors file",
        "empty_dir": "no Orbax checkpoint in this directory",
        "missing.pth": "no such file or directory",
    }
    for name, match in cases.items():
        with pytest.raises(WeightsError, match=match) as e:
            flaxres.create_model("resnet20", pretrained=tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "aka.th"
    torch.save({"state_dict": _dp(akamaster().state_dict())}, path)
    with pytest.raises(ConversionError) as e:
        flaxres.create_model("resnet32", pretrained=path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: state dict (akamaster layout, 3-3-3 blocks per stage) does "
                          "not fit resnet32 (5-5-5 blocks per stage)")
    assert "60 missing: " in msg and "layer1.3.conv1.weight" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet18", 64)])
def test_intermediates_equal_the_pytorch_reference(name, size):
    """Stem (after the max-pool where there is one) and every stage, against forward hooks on
    the PyTorch reference; logits, pooled embedding and feature_info agree with them."""
    torch.manual_seed(0)
    ref = _randomise_bn(create_torch_model(name))
    names = ["maxpool"] + [f"layer{i + 1}" for i in range(4 if name == "resnet18" else 3)]
    acts = {}
    for n in names:
        getattr(ref, n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    model = from_torch(name, ref.state_dict())
    model.eval()

    @nnx.jit
    def run(m, x):
        out, feats = m.forward_intermediates(x)
        return out, feats, m.forward_head(m.forward_features(x), pre_logits=True)

    out, feats, pooled = run(model, x)
    np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-4, atol=1e-4)
    assert [f.module for f in model.feature_info] == ["stem"] + names[1:]
    for n, info, got in zip(names, model.feature_info, feats, strict=True):
        want = acts[n].numpy().transpose(0, 2, 3, 1)
        assert got.shape == (2, size // info.reduction, size // info.reduction, info.num_chs)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=n)
    np.testing.assert_allclose(np.asarray(pooled), acts[names[-1]].numpy().mean(axis=(2, 3)),
                               rtol=1e-5, atol=1e-5)
    _, last_two = model.forward_intermediates(x, indices=2)
    assert [f.shape for f in last_two] == [f.shape for f in feats[-2:]]
    with pytest.raises(ValueError, match=r"indices \[9\] out of range"):
        model.forward_intermediates(x, indices=[0, 9])


# ----------------------------------------------------------------------------- ImageNet predict CLI


@pytest.mark.parametrize("width, height", [(257, 301), (301, 257), (500, 333), (333, 500),
                                           (224, 225), (225, 224), (255, 255), (256, 256)])
def test_predict_preprocessing_equals_torchvisions_pixel_by_pixel(width, height):
    """``Resize(256)`` + ``CenterCrop(224)`` on odd and unequal sizes, where the resized long
    side and the crop's offsets round (257x301 resizes to 256x299: an offset of 37.5)."""
    import torchvision.transforms as T
    from PIL import Image

    from flaxres import predict

    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    img = Image.fromarray(pixels)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(predict.IMAGENET_MEAN, predict.IMAGENET_STD)])
    np.testing.assert_allclose(predict.preprocess(img), tf(img).numpy().transpose(1, 2, 0),
                               atol=1e-6)


def test_predict_cli_equals_torchvision(tmp_path, capsys):
    """resnet18 with random weights (a sharpened head, so the top 5 are well apart) on a
    non-square JPEG: torchvision's transform and model give the same top 5 and probabilities."""
    import torchvision
    import torchvision.transforms as T
    from PIL import Image

    from flaxres import predict

    torch.manual_seed(0)
    ref = _randomise_bn(torchvision.models.resnet18())
    with torch.no_grad():
        ref.fc.weight.mul_(40)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (270, 330, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.jpg", quality=90)
    (tmp_path / "notes.jpg").write_text("not an image")

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(predict.IMAGENET_MEAN, predict.IMAGENET_STD)])
    with Image.open(tmp_path / "img.jpg") as img:
        want_x = tf(img)
        np.testing.assert_allclose(predict.preprocess(img), want_x.numpy().transpose(1, 2, 0),
                                   atol=1e-6)
    with torch.no_grad():
        probs = torch.softmax(ref(want_x[None]), -1)[0].numpy()
    top = np.argsort(-probs)[:5]
    classes = predict.imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "tench"

    predict.main(["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"),
                  str(tmp_path / "img.jpg")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "img.jpg") and len(lines) == 6
    for rank, (line, c) in enumerate(zip(lines[1:], top), 1):
        assert line.split()[0] == f"{rank}." and classes[c] in line
        assert line.endswith(f"{probs[c]:7.2%}")
    (got,) = predict.predict("resnet18", str(tmp_path / "r18.pth"), [str(tmp_path / "img.jpg")])
    assert [name for name, _ in got] == [classes[c] for c in top]
    np.testing.assert_allclose([p for _, p in got], probs[top], rtol=1e-4, atol=1e-6)

    with pytest.raises(SystemExit) as e:
        predict.main(["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"),
                      str(tmp_path / "img.jpg"), str(tmp_path / "notes.jpg")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'notes.jpg'}: not a readable image") and "\n" not in err
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18_10.pth")
    with pytest.raises(SystemExit) as e:
        predict.main(["--arch", "resnet18", "--weights", str(tmp_path / "r18_10.pth"),
                      str(tmp_path / "img.jpg")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'r18_10.pth'}: the weights "
                                               "have 10 classes, not ImageNet's 1000")


# ----------------------------------------------------------------------------- fine-tuning in train.cifar


def test_train_cifar_init_from_with_frozen_backbone(tmp_path, caplog):
    """An akamaster-layout resnet8 with a 7-class head, fine-tuned on 10-class data: fresh head
    (and a warning), backbone unchanged by two SGD steps, head trained."""
    import orbax.checkpoint as ocp

    from train import cifar, synthetic

    torch.manual_seed(0)
    ref = _randomise_bn(create_torch_model("resnet8", num_classes=7))
    sd = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": _dp(sd), "best_prec1": 50.0}, tmp_path / "r8.th")
    src = synthetic.write_cifar10_python(tmp_path, synthetic.make_arrays(64, 32, seed=0), tar=True)
    common = ["--arch", "resnet8", "--data-dir", str(src), "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "32", "--eval-batch-size", "32", "--no-plot", "--steps", "2"]
    wd = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="flaxres"):
        cifar.main([*common, "--workdir", str(wd), "--init-from", str(tmp_path / "r8.th"),
                    "--freeze-backbone"])
    assert "fresh 10-class head" in caplog.text
    saved = ocp.StandardCheckpointer().restore((wd / "checkpoints" / "last" / "2" / "state")
                                               .absolute())["state"]["params"]
    np.testing.assert_array_equal(np.asarray(saved["conv1"]["kernel"]["value"]).transpose(3, 2, 0, 1),
                                  ref.conv1.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(saved["layer3"]["0"]["bn2"]["scale"]["value"]),
                                  ref.layer3[0].bn2.weight.detach().numpy())
    fresh = flaxres.cifar_resnet(8, num_classes=10, rngs=nnx.Rngs(0))
    assert not np.allclose(saved["fc"]["kernel"]["value"], fresh.fc.kernel[...])


@pytest.mark.parametrize("args,match", [
    (["--init-from", "{tmp}/notes.pth"], r"error: {tmp}/notes.pth: not a checkpoint"),
    (["--init-from", "{tmp}/r20.pth"],
     (r"error: {tmp}/r20.pth: state dict \(torchvision layout, 3-3-3 blocks per stage\) does "
      r"not fit resnet8 \(1-1-1 blocks per stage\): 72 unexpected")),
    (["--freeze-backbone"], "--freeze-backbone needs --init-from PATH"),
])
def test_train_cifar_bad_init_from(tmp_path, capsys, args, match):
    """One line, exit 2, no workdir written."""
    from train import cifar, synthetic

    (tmp_path / "notes.pth").write_text("not weights")
    torch.save(create_torch_model("resnet20").state_dict(), tmp_path / "r20.pth")
    src = synthetic.write_cifar10_python(tmp_path, synthetic.make_arrays(64, 32, seed=0), tar=True)
    wd = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cifar.main(["--arch", "resnet8", "--data-dir", str(src), "--cache-dir",
                    str(tmp_path / "cache"), "--batch-size", "32", "--workdir", str(wd),
                    *[a.format(tmp=tmp_path) for a in args]])
    assert e.value.code == 2 and not wd.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(match.format(tmp=tmp_path), err[-1])


def test_convert_cli_bad_file_is_one_line(tmp_path, capsys):
    from flaxres.convert import main

    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(SystemExit) as e:
        main(["--arch", "resnet20", str(tmp_path / "notes.pth"), str(tmp_path / "out")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'notes.pth'}: not a checkpoint: expected")
    assert "\n" not in err
