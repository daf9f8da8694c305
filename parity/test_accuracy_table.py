"""parity.accuracy_table: results files of one recipe merge into one row; a bad file is one
line and exit 2."""

import json

import pytest

from parity import accuracy_table

CONFIG = {"arch": "resnet32", "epochs": 30, "steps": None, "subset": None, "schedule": "cosine",
          "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128}
MACHINE = {"cpu": "AMD EPYC (family 25 model 1, avx2)", "cores": 2, "devices": ["cpu:0"],
           "date_utc": "2026-12-01 17:00 UTC"}


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
                       "88.12% (seed 0) | 87.50% ± 0.71% (seeds 0, 1) | 2.00 h / 1.50, 1.50 h | "
                       "AMD EPYC (family 25 model 1, avx2), 2 cores, 2026-12-01; JAX on CPU, "
                       "PyTorch on cpu; by hand |")


@pytest.mark.parametrize("content, cause", [
    (None, "No such file or directory"),
    ("{", "not a parity.accuracy results file (JSONDecodeError"),
    ('{"config": {"arch": "resnet20"}}', "not a parity.accuracy results file (KeyError"),
])
def test_a_bad_results_file_is_one_line_and_exit_2(tmp_path, capsys, content, cause):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        accuracy_table.main([str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: {cause}")
