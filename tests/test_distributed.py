"""Multi-process training on one machine: two processes on 127.0.0.1 (CPU, Gloo collectives),
one device each, against one process over the same two devices. Loss, accuracy and the final
parameters agree to fp32 noise; a killed process makes the survivor stop with a one-line error;
``--resume`` of both continues to the same result."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxres import checkpoint
from flaxres.checkpoint import newest_step
from tests import test_imagenet
from tests.test_input import folder  # noqa: F401 - the generated image folder fixture
from tests.test_train import by_hand
from train import cifar, imagenet, inference, loop, parallel, synthetic
from train.config import Config

# Each test runs several JAX processes: under pytest-xdist they take turns on one worker.
pytestmark = pytest.mark.xdist_group("distributed")

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, BATCH = 128, 33, 32  # 4 steps per epoch; 33 test images: 2 eval batches, padded
COMMON = ["--arch", "resnet8", "--batch-size", str(BATCH), "--eval-batch-size", "32",
          "--log-every", "2", "--no-plot"]
TIMING = ("epoch_time", "img_per_s")


@pytest.fixture(scope="module")
def env(tmp_path_factory, xla_env):
    root = tmp_path_factory.mktemp("dist")
    src = synthetic.write_cifar10_python(root, synthetic.make_arrays(N_TRAIN, N_TEST, seed=0),
                                         tar=True)
    e = dict(os.environ, FLAXRES_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", **xla_env)
    return {"root": root, "src": str(src), "env": e}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(env, workdir: Path, *args, command: list[str] | None = None) -> subprocess.Popen:
    """One process over two (forced host) devices; ``command``: the trainer and its data flags
    (default: train.cifar on the synthetic CIFAR)."""
    e = dict(env["env"], XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.Popen([sys.executable, "-m", *(command or cifar_command(env)), "--workdir",
                             str(workdir), *args], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cifar_command(env) -> list[str]:
    return ["train.cifar", "--data-dir", env["src"], *COMMON]


def pair(env, workdir: Path, *args, command: list[str] | None = None) -> list[subprocess.Popen]:
    """Two processes with one device each, as on two hosts, sharing ``workdir``."""
    port = free_port()
    e = dict(env["env"], XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return [subprocess.Popen([sys.executable, "-m", *(command or cifar_command(env)), "--workdir",
                              str(workdir), *args, "--distributed",
                              "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i), "--peer-timeout", "20"],
                             cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]


def finish(procs: list[subprocess.Popen], rc: int = 0) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == rc, out
        outs.append(out)
    return outs


def history(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


def last_run(workdir: Path) -> loop.Run:
    """The last checkpoint, restored on this process's one device whatever the device count
    that saved it."""
    run = loop.setup(Config(arch="resnet8", batch_size=BATCH), None)
    last = workdir / "checkpoints" / "last"
    run.state = checkpoint.restore_state(last, newest_step(last), {
        "state": run.state, "metrics": loop.zero_metrics(run)})["state"]
    return run


def final_params(workdir: Path) -> np.ndarray:
    """The last checkpoint's parameters and BatchNorm statistics."""
    s = last_run(workdir).state
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves((s.params, s.batch_stats))])


def assert_same_run(a: Path, b: Path, params=final_params) -> None:
    ha, hb = history(a), history(b)
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for x, y in zip(ha, hb):
        assert x.keys() == y.keys()
        for k in x:  # fp32 reduction order differs between the two layouts
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (k, x, y)
    np.testing.assert_allclose(params(a), params(b), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_process(env):
    wd = env["root"] / "single"
    out = finish([single(env, wd, "--epochs", "2")])[0]
    assert "over 2 cpu device(s) in 1 process(es)" in out
    return wd


def test_lost_peer_is_one_line_naming_the_cause_and_the_remedy():
    xla = RuntimeError("INTERNAL: Error dispatching computation: Error dispatching computation: "
                       "Gloo AllGather failed: Connection closed by peer\nstack...")
    msg = parallel.lost_peer_message(xla)
    assert "\n" not in msg and "dispatching" not in msg
    assert msg.startswith("error: process 0 of 1: a collective with the other processes failed "
                          "(INTERNAL: Gloo AllGather failed: Connection closed by peer)")
    assert "--resume" in msg


def test_peer_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        cifar.parse_args(["--peer-timeout", "0"])
    assert e.value.code == 2
    assert "--peer-timeout 0: must be a positive number of seconds" in capsys.readouterr().err


def test_distributed_without_its_settings_is_a_clear_error(env):
    out = subprocess.run([sys.executable, "-m", "train.cifar", "--distributed", "--coordinator",
                          f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env["env"], text=True,
                         capture_output=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [(
        "error: --distributed: jax.distributed.initialize failed (Number of processes must be "
        "defined.); give --coordinator, --num-processes and --process-id unless the cluster is "
        "auto-detected (docs/distributed.md)")]


@pytest.mark.full  # ~2 min on the 2-core machine: three processes compile resnet8 afresh
def test_two_processes_train_like_one_process_over_the_same_devices(env, one_process):
    wd = env["root"] / "pair"
    out0, out1 = finish(pair(env, wd, "--epochs", "2"))
    assert "over 2 cpu device(s) in 2 process(es)" in out0
    assert "epoch   2 |" in out0 and "epoch" not in out1  # process 0 alone logs
    assert_same_run(wd, one_process)
    # Each process evaluates its shard of every padded batch; the reduced sums count each test
    # image once, as its own prediction says.
    _, _, xte, yte = synthetic.make_arrays(N_TRAIN, N_TEST, seed=0)
    want, logged = by_hand(last_run(wd), xte, yte), history(wd)[-1]
    assert logged["test_acc"] == pytest.approx(want["test_acc"], abs=1e-6)
    assert logged["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)


@pytest.mark.full
def test_killed_peer_stops_the_other_and_resume_continues(env):
    reference = env["root"] / "pair-ref"
    finish(pair(env, reference, "--epochs", "4"))
    wd = env["root"] / "pair-killed"
    procs = pair(env, wd, "--epochs", "4")
    seen = ""
    while "epoch   1 |" not in seen:
        line = procs[0].stdout.readline()
        assert line, seen
        seen += line
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.monotonic() - t0
    procs[1].wait()
    assert procs[0].returncode != 0, out
    assert waited < 60, out
    assert "error: process 0 of 2: a collective with the other processes failed" in out, out
    assert "Traceback" not in out, out
    assert len(history(wd)) < 4
    finish(pair(env, wd, "--epochs", "4", "--resume"))
    assert history(wd) == history(reference)
    np.testing.assert_array_equal(final_params(wd), final_params(reference))


@pytest.mark.full
def test_imagenet_two_processes_train_like_one_process_over_the_same_devices(env, folder):  # noqa: F811
    """Each process reads its rows of every global batch from the image folder; the global
    batches, hence the run, are one process's."""
    command = ["train.imagenet", "--data-dir", str(folder), *test_imagenet.COMMON]
    one, two = env["root"] / "inet-single", env["root"] / "inet-pair"
    finish([single(env, one, "--epochs", "2", command=command)])
    out0, _ = finish(pair(env, two, "--epochs", "2", command=command))
    assert "over 2 cpu device(s) in 2 process(es)" in out0

    def params(workdir: Path) -> np.ndarray:
        _, run, _ = inference.restore(imagenet.parse_args(
            [*command[1:], "--checkpoint", str(workdir / "checkpoints" / "last")]))
        s = run.state
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves((s.params, s.batch_stats))])

    assert_same_run(two, one, params)
