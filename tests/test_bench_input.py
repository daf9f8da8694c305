"""bench.input: its synthetic JPEG folder is deterministic and photo-sized, a tiny in-process run
of both pipelines writes the results it promises, and a missing folder is one line; bench.stall
on a tiny net."""

import json

import pytest
from PIL import Image

from bench import input as bench_input


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = bench_input.main(["--make-images", str(root), "--count", "6", "--classes", "2",
                                "--seed", "1"])
    assert summary["train"]["images"] == 6 and summary["val"]["images"] == 2
    return root


def test_synthetic_images_are_deterministic_and_photo_sized(folder, tmp_path):
    files = sorted((folder / "train").rglob("*.JPEG"))
    assert len(files) == 6 and {f.parent.name for f in files} == {"c000", "c001"}
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 300 <= min(img.size) <= 500
            assert 3 / 4 - 0.01 <= img.width / img.height <= 4 / 3 + 0.01
        assert 20_000 < f.stat().st_size < 250_000  # compresses like a photograph, not a flat fill
    again = tmp_path / "again"
    bench_input.make_images(again, 2, classes=2, seed=1)
    assert (again / "train/c001/train_0000001.JPEG").read_bytes() == \
        (folder / "train/c001/train_0000001.JPEG").read_bytes()


def test_tiny_run_writes_both_rates_stages_and_settings(folder, tmp_path, capsys):
    out = tmp_path / "input.json"
    bench_input.main(["--data-dir", str(folder), "--image-size", "32", "--workers", "0",
                      "--batch-size", "2", "--batches", "2", "--rounds", "1",
                      "--stage-images", "3", "--crops", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    for side in ("flaxres", "torchvision"):
        assert res[side]["img_s"] > 0 and len(res[side]["rounds"]) == 1
        assert res[side]["rounds"][0]["images"] == 4
        stages = res["stages"][side]
        assert all(stages[k] > 0 for k in ("decode_ms", "transform_ms", "collate_ms",
                                            "total_ms"))
    assert res["flaxres"]["batch"] == "uint8 [2, 32, 32, 3]"
    assert res["torchvision"]["batch"] == "uint8 [2, 3, 32, 32]"
    assert res["ratio"] == pytest.approx(res["flaxres"]["img_s"] / res["torchvision"]["img_s"])
    assert {k: res[k] for k in ("image_size", "workers", "batch_size", "batches", "rounds",
                                "files")} == {"image_size": 32, "workers": 0, "batch_size": 2,
                                              "batches": 2, "rounds": 1, "files": 6}
    assert res["machine"]["cores"] >= 1 and "torch" in res["machine"]
    assert "ratio flaxres / torchvision" in capsys.readouterr().out


@pytest.mark.parametrize("make", [False, True])
def test_missing_or_empty_data_dir_is_one_line(tmp_path, capsys, make):
    where = tmp_path / "data"
    if make:
        (where / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        bench_input.main(["--data-dir", str(where)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-dir" in err and str(where) in err
    assert "Traceback" not in err


def test_stall_measures_the_wait_for_data_within_the_steps(tmp_path):
    from bench import stall

    bench_input.make_images(tmp_path / "imgs", 16, classes=2)
    out = stall.main(["--data-dir", str(tmp_path / "imgs"), "--arch", "resnet8",
                      "--image-size", "32", "--batch-size", "4", "--steps", "4", "--skip", "1",
                      "--workers", "0", "--json", str(tmp_path / "stall.json")])
    assert out["steps_timed"] == 3 and 0 <= out["wait_s"] < out["step_s"]
    assert out["stall_share"] == pytest.approx(out["wait_s"] / out["step_s"])
    assert json.loads((tmp_path / "stall.json").read_text())["stall_share"] == out["stall_share"]
