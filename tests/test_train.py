"""train.cifar end to end on tiny synthetic data with resnet8: CLI, metrics/plots/checkpoints,
resume after SIGKILL and after Ctrl-C equal to an uninterrupted run, divergence stop, eval-only,
predict, corrupt checkpoints, and 8-device vs 1-device data parallelism."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bench import accuracy_table
from flaxres import checkpoint
from train import cifar, host, inference, loop, steps, synthetic
from train.config import Config

ROOT = Path(__file__).resolve().parents[1]
# 67 test images: neither the eval batch (64) nor any device count here divides them, so the
# evaluation pads a batch and must not count the padding.
N_TRAIN, N_TEST, BATCH = 512, 67, 32
SPE = N_TRAIN // BATCH  # 16 steps per epoch, about 2 s on a 2-core CPU
COMMON = ["--arch", "resnet8", "--batch-size", str(BATCH), "--eval-batch-size", "64",
          "--log-every", "2"]
TIMING = ("epoch_time", "img_per_s")


@pytest.fixture(scope="module")
def env(tmp_path_factory, xla_env):
    """Synthetic CIFAR python archive, a data cache, and the session's XLA compilation cache for
    every run of this module (in and out of process), so resnet8 compiles once."""
    root = tmp_path_factory.mktemp("train")
    arrays = synthetic.make_arrays(N_TRAIN, N_TEST, seed=0)
    src = synthetic.write_cifar10_python(root, arrays, tar=True)
    e = dict(os.environ, FLAXRES_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", **xla_env)
    os.environ["FLAXRES_CACHE"] = e["FLAXRES_CACHE"]  # for the in-process runs below
    return {"root": root, "src": str(src), "env": e, "arrays": arrays}


def cli(env, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.cifar", "--data-dir", env["src"],
                             *COMMON, *args], cwd=ROOT, env=env["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(p: subprocess.Popen, rc: int = 0) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == rc, out
    return out


def history(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted 3-epoch run through the command line."""
    wd = env["root"] / "ref"
    out = finish(cli(env, "--epochs", "3", "--workdir", str(wd)))
    return wd, out


def test_help_documents_every_flag_and_default(capsys):
    with pytest.raises(SystemExit):
        cifar.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    for must in ("--batch-size BATCH_SIZE global batch size", "(default: 128)", "(default: 0.1)",
                 "(default: 0.0001)", "{paper,multistep,cosine}", "--no-nesterov",
                 "--predict PREDICT [PREDICT ...]", "{fp32,bf16}"):
        assert must in text


def test_named_recipes_set_the_defaults_and_flags_still_win():
    cfg = cifar.parse_args(["--recipe", "wrn", "--arch", "wrn28_10", "--dropout", "0.3"])
    assert (cfg.epochs, cfg.milestones, cfg.lr_gamma, cfg.weight_decay, cfg.nesterov) == (
        200, (60, 120, 160), 0.2, 5e-4, True)
    lr = cfg.lr_schedule(391)  # 50k images at batch 128
    assert [float(lr(s)) for s in (0, 60 * 391, 120 * 391, 160 * 391)] == pytest.approx(
        [0.1, 0.02, 0.004, 0.0008])
    assert cifar.parse_args(["--recipe", "wrn", "--epochs", "3"]).epochs == 3
    assert cifar.parse_args(["--recipe", "he2016"]).lr_schedule(390)(48_000) == pytest.approx(1e-3)
    nets = {a: loop.build_model(cifar.parse_args(["--arch", a, "--dropout", "0.3"]))
            for a in ("wrn28_10", "preact_resnet110")}
    assert nets["wrn28_10"].layer1[0].dropout.rate == 0.3
    assert nets["preact_resnet110"].layer3[17].dropout.rate == 0.3


@pytest.mark.parametrize("argv, match", [
    (["--recipe", "nope"], "--recipe nope: no such recipe; train/recipes/ has he2016, tv_resnet50, tv_resnet50_v2_optim, wrn"),
    (["--arch", "resnet20", "--dropout", "0.3"], "--dropout 0.3: resnet20 has no dropout"),
])
def test_bad_recipe_or_dropout_is_one_line(env, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cifar.main(["--data-dir", env["src"], "--workdir", str(env["root"] / "bad"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) <= 3 and "Traceback" not in err


def test_dropout_draws_per_step_and_reruns_exactly(env):
    """A Wide ResNet with dropout trains; its masks come from the run's seed and step alone,
    so a rerun (or a resumed run) repeats it, and without dropout it trains otherwise."""
    def run(name, *args):
        finish(cli(env, "--arch", "wrn10_1", "--epochs", "1", "--no-plot", "--workdir",
                   str(env["root"] / name), *args))
        return history(env["root"] / name)

    a, b, plain = run("wrn-a", "--dropout", "0.3"), run("wrn-b", "--dropout", "0.3"), run("wrn-0")
    assert a == b and a != plain
    assert np.isfinite(a[-1]["train_loss"])


def test_schedules_follow_the_paper():
    cfg = Config()
    s = cfg.lr_schedule(391)
    assert cfg.total_steps(391) == 64000
    assert [float(s(t)) for t in (0, 31999, 32000, 47999, 48000)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001])
    warm = Config(arch="resnet110").lr_schedule(391)
    assert [float(warm(t)) for t in (0, 399, 400, 32000)] == pytest.approx([0.01, 0.01, 0.1, 0.01])
    short = Config(epochs=8, schedule="multistep").lr_schedule(10)  # milestones 4 and 6 epochs
    assert [float(short(t)) for t in (39, 40, 59, 60)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    comp = Config(steps=640).lr_schedule(10)  # compressed paper schedule: /10 at 320 and 480
    assert [float(comp(t)) for t in (319, 320, 480)] == pytest.approx([0.1, 0.01, 0.001])
    cos = Config(epochs=2, schedule="cosine").lr_schedule(50)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(50)) == pytest.approx(0.05)


def test_cli_trains_logs_plots_and_checkpoints(reference):
    wd, out = reference
    h = history(wd)
    assert [r["epoch"] for r in h] == [1, 2, 3] and h[-1]["step"] == 3 * SPE
    assert h[-1]["train_loss"] < h[0]["train_loss"] and h[-1]["test_acc"] > 0.5
    assert [r["lr"] for r in h] == pytest.approx([0.1, 0.01, 0.001])  # compressed paper schedule
    assert "epoch   3 | train loss" in out and "img/s" in out
    assert "done: best test acc" in out and "final test acc" in out
    assert (wd / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["best", "last"]
    assert (wd / "checkpoints" / "last" / str(3 * SPE)).is_dir()


def test_the_results_table_reads_a_finished_run_with_its_machine(reference):
    row = accuracy_table.main([str(reference[0])]).splitlines()[2]
    assert row.startswith(f"| resnet8 | 3 epochs, paper, lr 0.1, wd 0.0001, batch {BATCH} | ")
    machine = accuracy_table.from_workdir(reference[0])["machine"]
    assert re.fullmatch(rf"{re.escape(host.cpu_name())}, {os.cpu_count()} cores, "
                        r"\d{4}-\d\d-\d\d; JAX on CPU", machine)


# Kill and Ctrl-C arrive at a known step through loop.train's on_step hook (a timed signal
# raced the epoch, which takes under a second).
_KILL_AT = r"""
import os, signal, sys
from train import cifar, loop
stop = int(sys.argv[1])
loop.train(cifar.parse_args(sys.argv[2:]),
           on_step=lambda step: step == stop and os.kill(os.getpid(), signal.SIGKILL))
"""


def test_resume_after_sigkill_mid_epoch_equals_uninterrupted(env, reference):
    wd = env["root"] / "killed"
    p = subprocess.run([sys.executable, "-c", _KILL_AT, str(SPE + 5), "--data-dir", env["src"],
                        *COMMON, "--epochs", "3", "--workdir", str(wd)], cwd=ROOT,
                       env=env["env"], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert len(history(wd)) == 1
    out = finish(cli(env, "--epochs", "3", "--workdir", str(wd), "--resume"))
    assert "resumed from" in out and f"at step {SPE} (epoch 2, 0/{SPE}" in out
    assert history(wd) == history(reference[0])
    machines = checkpoint.restore_meta(wd / "checkpoints" / "last", 3 * SPE)["machines"]
    assert [m["cpu"] for m in machines] == [host.cpu_name()]  # resumed on the same machine


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_mid_epoch_and_resume_equals_uninterrupted(env, reference, capsys,
                                                                   signum, code):
    """Ctrl-C, or the SIGTERM a scheduler sends before it preempts: the run saves at the next
    step boundary, says how to resume in one line and exits (0 for SIGTERM: stopped as asked),
    and the resumed run ends exactly as the uninterrupted one."""
    wd = env["root"] / f"interrupted-{signum}"
    stop = SPE + 5  # mid-epoch 2: the partial epoch is in the checkpoint

    def signal_at(step: int) -> None:
        if step == stop:
            os.kill(os.getpid(), signum)

    with pytest.raises(SystemExit) as e:
        loop.train(cifar.parse_args(["--data-dir", env["src"], *COMMON, "--epochs", "3",
                                     "--workdir", str(wd)]), on_step=signal_at)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"{signal.Signals(signum).name} at step {stop}: saved "
                       f"{wd / 'checkpoints' / 'last'}; continue with --workdir {wd} --resume")
    out = finish(cli(env, "--epochs", "3", "--workdir", str(wd), "--resume"))
    assert f"at step {stop} (epoch 2, {stop - SPE}/{SPE}" in out
    assert history(wd) == history(reference[0])


def test_existing_run_needs_resume_and_matching_config(env, reference, capsys):
    wd = env["root"] / "copy"
    shutil.copytree(reference[0], wd)
    base = ["--data-dir", env["src"], *COMMON, "--workdir", str(wd), "--epochs", "3"]
    with pytest.raises(SystemExit) as e:
        cifar.main(base)
    assert e.value.code == 2 and "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cifar.main([*base, "--resume", "--seed", "1"])
    assert "seed differ from the checkpoint" in capsys.readouterr().err


def test_divergence_stops_clearly_and_keeps_last_good_checkpoint(env, reference, capsys):
    wd = env["root"] / "diverge"
    shutil.copytree(reference[0], wd)
    (wd / "checkpoints" / "best").rename(wd / "best-saved")
    with pytest.raises(SystemExit) as e:  # continue the finished run at an absurd lr
        cifar.main(["--data-dir", env["src"], *COMMON, "--workdir", str(wd), "--resume",
                    "--epochs", "5", "--lr", "1e30", "--no-plot"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "loss became NaN/inf at step" in err and "last good checkpoint" in err
    assert [d.name for d in (wd / "checkpoints" / "last").iterdir()] == [str(3 * SPE)]
    assert len(history(wd)) == 3


def by_hand(run: loop.Run, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Test loss and accuracy from each image's own logits, in float64, with no batching."""
    logits = np.asarray(jax.jit(lambda s, x: steps.predict_logits(
        run.eval_def, s, x, mean=run.mean, std=run.std))(run.state, images), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return {"test_loss": float(-logp[np.arange(len(labels)), labels].mean()),
            "test_acc": float((logits.argmax(1) == labels).mean())}


def test_evaluation_counts_each_test_image_once(env, reference, capsys):
    """The last epoch's logged test loss and accuracy and ``--eval-only``'s are those of the
    per-image predictions of the last checkpoint: padding rows count for nothing."""
    _, _, xte, yte = env["arrays"]
    last = reference[0] / "checkpoints" / "last"
    cfg = cifar.parse_args(["--eval-only", "--checkpoint", str(last)])
    _, run, _ = inference.restore(cfg)
    want = by_hand(run, xte, yte)
    logged = history(reference[0])[-1]
    evaluated = inference.evaluate_checkpoint(cfg)
    for got in (logged, evaluated):
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1e-6)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
    assert f"({N_TEST} images)" in capsys.readouterr().out


def test_eval_only_reproduces_the_best_checkpoints_accuracy(env, reference, capsys):
    wd = reference[0]
    res = inference.evaluate_checkpoint(cifar.parse_args(["--eval-only", "--checkpoint", str(wd)]))
    best = max(history(wd), key=lambda h: h["test_acc"])
    assert res["test_acc"] == pytest.approx(best["test_acc"], abs=1e-6)
    assert res["test_loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    assert "test loss" in capsys.readouterr().out


def test_predict_prints_top_k_with_probabilities(env, reference, tmp_path, capsys):
    from PIL import Image

    _, _, xte, yte = env["arrays"]
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.kron(xte[i], np.ones((2, 2, 1), np.uint8))).save(paths[-1])  # 64x64
    top = inference.predict(cifar.parse_args(["--predict", *map(str, paths), "--top-k", "3",
                                          "--checkpoint", str(reference[0] / "checkpoints")]))
    out = capsys.readouterr().out
    assert len(top) == 3 and all(len(t) == 3 for t in top)
    for t, y in zip(top, yte[:3]):
        probs = [p for _, p in t]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert t[0][0] == synthetic.CIFAR10_CLASSES[y]
    assert "  1. " in out and "%" in out


def test_corrupt_or_missing_checkpoint_is_a_clear_error(env, reference, capsys):
    wd = env["root"] / "corrupt"
    shutil.copytree(reference[0], wd)
    for f in (wd / "checkpoints" / "best").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        cifar.main(["--eval-only", "--checkpoint", str(wd)])
    assert e.value.code == 2 and "is unreadable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cifar.main(["--eval-only", "--checkpoint", str(env["root"] / "nothing")])
    assert "nothing: no such file or directory" in capsys.readouterr().err


_PER_STEP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from train import data, loop, steps, synthetic
from train.config import Config
arrays = data.Arrays(*synthetic.make_arrays(128, 67, seed=0), data.CIFAR10_CLASSES)
cfg = Config(arch="resnet8", batch_size=32, lr=0.02, eval_batch_size=20)
run = loop.setup(cfg, arrays, 4)
perm = jnp.arange(128)
flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)]).tolist()
losses = []
for i in range(8):
    m = jax.device_put(steps.zero_metrics(), run.replicated)
    run.state, m = run.train_step(run.state, m, perm, run.train_x, run.train_y, jnp.int32(i % 4))
    losses.append(float(m["loss_sum"] / m["count"]))
    if i == 0:  # after one step: parameters and BatchNorm running statistics
        first = flat((run.state.params, run.state.batch_stats))
run.eval_sets["test"] = loop.make_eval_set(run, arrays.test_images, arrays.test_labels)
from tests.test_train import by_hand
evals = [loop.evaluate(run, "test"), by_hand(run, arrays.test_images, arrays.test_labels)]
print(json.dumps({"devices": jax.device_count(), "losses": losses, "first": first,
                  "evals": evals}))
"""


def test_eight_devices_train_like_one(env):
    def run(n):
        e = dict(env["env"], XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        out = subprocess.run([sys.executable, "-c", _PER_STEP], cwd=ROOT, env=e, text=True,
                             capture_output=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    one, eight = run(1), run(8)
    assert one["devices"] == 1 and eight["devices"] == 8
    for r in (one, eight):  # 67 images in eval batches of 20 (16 over 8 devices): padded
        evaluated, hand = r["evals"]
        assert evaluated["test_acc"] == pytest.approx(hand["test_acc"], abs=1e-6)
        assert evaluated["test_loss"] == pytest.approx(hand["test_loss"], rel=1e-5)
    # One step is the same function (BatchNorm statistics over the global batch: per-device
    # statistics would change the first loss by ~1e-2) ...
    assert eight["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
    np.testing.assert_allclose(eight["first"], one["first"], rtol=1e-5, atol=1e-6)
    # ... and over 8 steps the fp32 reduction-order noise (~1e-7) grows only to ~1e-5.
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-4)
    assert one["losses"][-1] < one["losses"][0]
