"""bench.speed.infer's table and flags (the timing itself is a benchmark, not a test)."""

import pytest

from bench.speed import infer


def _per(columns, scale=1.0):
    return {c: {"1": {"median_ms": 2.0 * scale, "p90_ms": 3.0 * scale, "img_s": 500 / scale},
                "64": {"median_ms": 20.0 * scale, "p90_ms": 30.0 * scale,
                       "img_s": 3200 / scale}} for c in columns}


def test_the_table_shows_the_fastest_pytorch_and_both_ratios():
    per = {**_per(["flaxres", "flaxres-defaults", "ort-flaxres"]), **_per(["ort-torch"], 1.1),
           **_per(["torch-eager"], 2.0), **_per(["torch-compile"], 1.25)}
    lines = infer.table("resnet20", per, 64).splitlines()
    assert lines[2].count("|") == 9 and "fastest PyTorch" in lines[2]
    assert lines[4] == ("| batch 1, median ms | 2.00 | 2.00 | 2.00 | 2.20 | 2.50 (compile) | "
                        "1.25x | 1.10x |")
    assert lines[6].endswith("| 2560 (compile) | 1.25x | 1.10x |")


def test_a_subset_of_columns_shows_only_its_ratio():
    lines = infer.table("resnet50", _per(["ort-flaxres", "ort-torch"]), 64).splitlines()
    assert lines[2] == "| | ORT, flaxres ONNX | ORT, PyTorch ONNX | ORT flaxres / ORT PyTorch |"
    assert lines[4].endswith("| 1.00x |")


def test_unknown_columns_are_one_line(capsys):
    with pytest.raises(SystemExit):
        infer.parse_args(["--columns", "flaxres,tensorrt"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorrt: not among flaxres" in err
