"""bench.accuracy_table: results files and train.cifar workdirs of one recipe merge into one
row; a bad source is one line and exit 2."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import accuracy_table
from flaxres import checkpoint
from train.config import Config

CONFIG = {"arch": "resnet32", "epochs": 30, "steps": None, "subset": None, "schedule": "cosine",
          "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128}
MACHINE = {"cpu": "AMD EPYC (family 25 model 1, avx2)", "cores": 2, "devices": ["cpu:0"],
           "date_utc": "2026-12-01 17:00 UTC"}


def _refusal(capsys, sources):
    with pytest.raises(SystemExit) as e:
        accuracy_table.main(sources)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    return err


def _file(tmp_path, name, framework, seed, acc, hours, **extra):
    path = tmp_path / name
    path.write_text(json.dumps({"config": CONFIG, "runs": {framework: [
        {"seed": seed, "final_acc": acc, "train_time": hours * 3600}]}, **extra}))
    return str(path)


def test_one_recipe_in_two_files_is_one_row(tmp_path, capsys):
    flax = _file(tmp_path, "f.json", "flax", 0, 0.8812, 2.0, machine=MACHINE, torch_device="cpu")
    torch = [_file(tmp_path, f"t{s}.json", "torch", s, acc, 1.5, machine="by hand")
             for s, acc in ((0, 0.88), (1, 0.87))]
    accuracy_table.main([flax, *torch])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3
    assert rows[2] == ("| resnet32 | 30 epochs, cosine, lr 0.1, wd 0.0005, batch 128 | "
                       "88.12% (seed 0) | 87.50% ± 0.71% (seeds 0, 1) | +0.62 points |")


def _gap_cell(tmp_path, capsys, flax_accs, torch_accs):
    """The gap column of the row that one results file per framework and seed make."""
    sources = [_file(tmp_path, f"{fw}{seed}.json", fw, seed, acc, 1.0)
               for fw, accs in (("flax", flax_accs), ("torch", torch_accs))
               for seed, acc in enumerate(accs)]
    accuracy_table.main(sources)
    return capsys.readouterr().out.strip().splitlines()[2].split(" | ")[4].removesuffix(" |")


def test_the_gap_is_tested_against_seed_noise_with_welchs_t_test(tmp_path, capsys):
    """Two seeds a side, ResNet-44's first: Welch's p is 0.26 on 1.14 degrees of freedom, where
    Student's t-test (2 degrees, pooled variance) would say 0.17."""
    gap = _gap_cell(tmp_path, capsys, (0.8821, 0.8835), (0.8746, 0.8798))
    assert gap == "+0.56 points (Welch's t-test p = 0.26)"


def test_seeds_alike_on_each_side_print_no_t_test_rather_than_nan(tmp_path, capsys):
    gap = _gap_cell(tmp_path, capsys, (0.88, 0.88), (0.87, 0.87))
    assert gap == "+1.00 points (no t-test: every seed alike on each side)"


@pytest.mark.parametrize("content, cause", [
    (None, "No such file or directory"),
    ("{", "not a bench.accuracy results file (JSONDecodeError"),
    ('{"config": {"arch": "resnet20"}}', "not a bench.accuracy results file (KeyError"),
])
def test_a_bad_results_file_is_one_line_and_exit_2(tmp_path, capsys, content, cause):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert _refusal(capsys, [str(path)]).startswith(f"error: {path}: {cause}")


def _workdir(tmp_path, name, step=390, seed=0, machines=(), **changes):
    """A train.cifar workdir as ``Checkpoints.save`` leaves it: the last checkpoint's meta holds
    the config and per-epoch history (the state is a stand-in; the table never reads it)."""
    cfg = Config(arch="resnet32", epochs=30, schedule="cosine", weight_decay=5e-4, seed=seed,
                 workdir=str(tmp_path / name), **changes)
    history = [{"epoch": e, "step": e * 13, "epoch_time": 360.0,  # peaks mid-run, as runs may
                "test_acc": 0.9 if e == 15 else 0.8 + e / 1000 + seed / 100}
               for e in range(1, step // 13 + 1)]
    checkpoint.save(tmp_path / name / "checkpoints" / "last", step, {"w": np.zeros(2)},
                    {"epoch": len(history), "config": cfg.to_dict(), "history": history,
                     "steps_per_epoch": 13, "machines": list(machines)})
    return str(tmp_path / name)


def test_a_train_cifar_workdir_is_flaxres_run_of_its_seed(tmp_path, capsys):
    workdirs = [_workdir(tmp_path, "w1", seed=1, machines=[MACHINE]), _workdir(tmp_path, "w0")]
    torch = _file(tmp_path, "t.json", "torch", 0, 0.88, 1.5, machine="by hand")
    accuracy_table.main([*workdirs, torch])
    row = capsys.readouterr().out.strip().splitlines()[2]
    assert row == ("| resnet32 | 30 epochs, cosine, lr 0.1, wd 0.0005, batch 128 | "
                   "83.50% ± 0.71% (seeds 0, 1) | 88.00% (seed 0) | -4.50 points |")


def test_a_workdir_trained_otherwise_is_another_row(tmp_path, capsys):
    accuracy_table.main([_workdir(tmp_path, "w", momentum=0.8, warmup="on"),
                         _file(tmp_path, "t.json", "torch", 0, 0.88, 1.5)])
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows] == [
        "30 epochs, cosine, lr 0.1, wd 0.0005, batch 128, momentum 0.8, warm-up 400 steps",
        "30 epochs, cosine, lr 0.1, wd 0.0005, batch 128"]


def test_a_seed_from_two_sources_is_refused(tmp_path, capsys):
    flax = _file(tmp_path, "f.json", "flax", 0, 0.8812, 2.0)
    workdir = _workdir(tmp_path, "w")
    assert _refusal(capsys, [flax, workdir]) == (
        f"error: {workdir}: flax seed 0 of resnet32 (30 epochs, cosine, lr 0.1, wd 0.0005, "
        f"batch 128) is also in {flax}")


@pytest.mark.parametrize("make, cause", [
    (lambda tmp: _workdir(tmp, "w", step=260), "unfinished run: its last checkpoint is step 260"),
    (lambda tmp: (tmp / "empty").mkdir() or str(tmp / "empty"), "no checkpoint in"),
])
def test_an_unusable_workdir_is_one_line_and_exit_2(tmp_path, capsys, make, cause):
    workdir = make(tmp_path)
    err = _refusal(capsys, [workdir])
    assert err.startswith(f"error: {workdir}: not a finished train.cifar workdir "
                          f"(ValueError: {cause}")


def test_a_workdir_with_corrupt_metadata_is_one_line_and_exit_2(tmp_path, capsys):
    workdir = _workdir(tmp_path, "w")
    (tmp_path / "w" / "checkpoints" / "last" / "390" / "meta" / "metadata").write_text("{")
    assert _refusal(capsys, [workdir]).startswith(
        f"error: checkpoint {tmp_path / 'w' / 'checkpoints' / 'last' / '390'} is unreadable")


def test_the_readme_quotes_the_shipped_results():
    """The README's results table is the output of the command it names, on the shipped
    results files, row for row."""
    root = Path(__file__).resolve().parents[1]
    sources = sorted((root / "docs/results").glob("accuracy-*.json"))
    out = accuracy_table.main([str(s) for s in sources])
    readme = (root / "README.md").read_text()
    assert "python -m bench.accuracy_table docs/results/accuracy-*.json" in readme
    assert len(out.splitlines()) == 8 and out in readme
