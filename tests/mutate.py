"""Mutation check: do the tests fail when the code is wrong?

    python tests/mutate.py            # every mutant; exits 1 if any survives
    python tests/mutate.py --list     # the mutants and the tests each one runs
    python tests/mutate.py --only sgd_decay_after_momentum cosine_warmup_total

Each mutant is one realistic bug (a snippet of a source file replaced by a wrong one). It is
applied to a scratch copy of the repository's tracked files, and the default-tier tests that cover
that file run there (``-x``: the first failure is enough). Mutants run ``--jobs`` at a time
(default: one per core), each in its own copy as one single-threaded pytest process without
xdist: with xdist, a mutant's few tests spent much of their time starting workers. A mutant whose
tests all pass *survived*: the suite would not have noticed that bug. A mutant whose snippet is no
longer in the source is an error too, so the list cannot silently go stale when the code moves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One realistic bug: ``old`` replaced by ``new`` in ``file``; one of ``tests`` must fail.
    A reviewer adds one with a line in MUTANTS."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    breaks: str  # the behaviour the bug breaks, which one of those tests must notice


def _forward(*case_ids: str, tests: tuple[str, ...] = (
        "test_eval_logits", "test_train_logits_and_bn_stats", "test_stage_features")
             ) -> tuple[str, ...]:
    """fp32 forward checks of these parity cases (by default eval, train + BN stats, features:
    the default tier's for a representative case)."""
    return tuple(f"parity/test_forward.py::{t}[{c}-fp32]" for c in case_ids for t in tests)


# The quick whole-net checks first: without xdist, the first failure ends the run.
MODELS = (_forward("resnet20", "resnet50")
          + _forward("resnet18", tests=("test_train_logits_and_bn_stats",))
          + ("tests/test_models.py",))
TRAIN = ("tests/test_train.py",)
PRETRAINED = ("tests/test_pretrained.py",)
TRAINING_PATH = ("parity/test_training_path.py",)
SCHEDULES = ("parity/test_optim.py::test_schedules_match_pytorch",) + TRAINING_PATH
OPTIM = ("parity/test_optim.py::test_sgd_step[resnet20]",) + TRAINING_PATH
CONVERT = ("parity/test_layouts.py", "parity/test_convert.py")
AUGMENT = ("tests/test_augment.py",)
INIT = ("tests/test_init.py",)
EVAL = ("tests/test_train.py", "-k", "counts_each_test_image")
EXPORT = ("tests/test_export.py", "-k", "onnxruntime_equals")
SEGMENTS = ("tests/test_export.py", "-k", "in_segments")

MUTANTS = [
    # Bugs planted by hand in copies of the code.
    Mutant("cosine_warmup_total", "train/optim.py",
           "optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1))",
           "optax.cosine_decay_schedule(base_lr, total_steps)", SCHEDULES,
           breaks="cosine decay ends at the run's last step after the warm-up"),
    Mutant("trainer_no_weight_decay", "train/loop.py",
           "tx = cfg.optimizer(steps_per_epoch)",
           'tx = Config.from_dict({**cfg.to_dict(), "weight_decay": 0.0}).optimizer(steps_per_epoch)',
           TRAINING_PATH,
           breaks="the trainer applies --weight-decay"),
    Mutant("sgd_decay_after_momentum", "train/optim.py",
           "return optax.chain(*decay, step)",
           "return optax.chain(optax.trace(decay=momentum, nesterov=nesterov), *decay, "
           "optax.scale_by_learning_rate(learning_rate))", OPTIM,
           breaks="weight decay is added before momentum, as in torch.optim.SGD"),
    Mutant("imagenet_maxpool_same", "flaxres/models.py",
           "return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2))",
           "return nnx.max_pool(x[:, 1:, 1:], window_shape=(3, 3), strides=(2, 2), "
           "padding='SAME')", MODELS,
           breaks="the ImageNet stem's max-pool pads 1 on each side"),
    Mutant("head_max_pool", "flaxres/models.py",
           "pooled = x.mean(axis=(1, 2))", "pooled = x.max(axis=(1, 2))", MODELS,
           breaks="the head averages over space"),
    Mutant("convert_kernel_hw_swap", "flaxres/convert.py",
           """_TO_TORCH = {"conv": (3, 2, 0, 1), "linear": (1, 0)}  # HWIO -> OIHW, (in, out) -> (out, in)
_FROM_TORCH = {"conv": (2, 3, 1, 0), "linear": (1, 0)}""",
           """_TO_TORCH = {"conv": (3, 2, 1, 0), "linear": (1, 0)}  # HWIO -> OIHW, (in, out) -> (out, in)
_FROM_TORCH = {"conv": (3, 2, 1, 0), "linear": (1, 0)}""", CONVERT,
           breaks="conv kernels convert OIHW <-> HWIO"),
    Mutant("stride2_conv_same", "flaxres/models.py",
           "padding=((p, p), (p, p))", 'padding="SAME"', MODELS,
           breaks="stride-2 convolutions pad symmetrically, not 'SAME'"),
    Mutant("bn_running_var_biased", "flaxres/models.py",
           "m * var * (n / max(n - 1, 1))", "m * var", MODELS,
           breaks="BatchNorm's running variance takes the unbiased batch variance"),
    Mutant("option_a_one_side", "flaxres/models.py",
           "lo = (self.cout - self.cin) // 2", "lo = 0", MODELS,
           breaks="option-A shortcuts zero-pad channels on both sides"),
    Mutant("train_step_stale_bn_stats", "train/steps.py",
           "new = TrainState(params, stats, opt_state,",
           "new = TrainState(params, state.batch_stats, opt_state,",
           TRAINING_PATH + TRAIN,
           breaks="the train step keeps the batch's BatchNorm statistics"),
    # Our own.
    Mutant("bn_momentum_flipped", "flaxres/models.py",
           "self.mean[...] = (1 - m) * self.mean[...] + m * mean",
           "self.mean[...] = m * self.mean[...] + (1 - m) * mean", MODELS,
           breaks="BatchNorm's momentum 0.1 weighs the batch, as in PyTorch"),
    Mutant("eval_uses_batch_stats", "flaxres/models.py",
           "        if self.use_running_average:\n            mean, var = self.mean[...], self.var[...]",
           "        if False:\n            mean, var = self.mean[...], self.var[...]", MODELS,
           breaks="eval mode normalises with the running statistics"),
    Mutant("bottleneck_stride_on_1x1", "flaxres/models.py",
           """        self.conv1 = L.conv(cin, width, 1)
        self.conv2 = L.conv(width, width, 3, stride, groups)""",
           """        self.conv1 = L.conv(cin, width, 1, stride)
        self.conv2 = L.conv(width, width, 3, 1, groups)""", MODELS,
           breaks="a Bottleneck strides on its 3x3 convolution"),
    Mutant("nesterov_ignored", "train/optim.py",
           "optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)",
           "optax.sgd(learning_rate, momentum=momentum or None, nesterov=False)", OPTIM,
           breaks="--nesterov gives Nesterov momentum"),
    Mutant("bn_backward_sign", "flaxres/ops.py",
           "(g - sum_g / m - xhat * (sum_gx / m))", "(g - sum_g / m + xhat * (sum_gx / m))",
           ("tests/test_ops.py",),
           breaks="the closed-form BatchNorm backward is the gradient"),
    Mutant("onednn_eval_residual_dropped", "flaxres/cpu/onednn.py",
           '"residual": np.int64(residual is not None)}', '"residual": np.int64(0)}', MODELS,
           breaks="oneDNN's eval post-ops add the residual"),
    Mutant("onednn_bn_var_cotangent_dropped", "flaxres/cpu/onednn.py",
           "dx = dx + (2.0 / m) * d_var * (x - mean)", "dx = dx", ("tests/test_onednn.py",),
           breaks="oneDNN BatchNorm's backward carries the variance's cotangent"),
    Mutant("wgrad_chunk_drops_tail", "flaxres/ops.py",
           "extra = nchunks * per - n", "extra = 0; nchunks = n // per; x, g = x[:nchunks * per], "
           "g[:nchunks * per]", ("tests/test_ops.py",),
           breaks="the chunked weight gradient covers every row"),
    Mutant("kuangliu_shortcut_not_renamed", "flaxres/convert.py",
           'r"^(layer\\d+\\.\\d+\\.)shortcut\\."), r"\\1downsample.")',
           'r"^(layer\\d+\\.\\d+\\.)shortcut_\\."), r"\\1downsample.")', PRETRAINED,
           breaks="shortcut.0/1 projections load as downsample.0/1"),
    Mutant("frozen_backbone_still_trains", "train/finetune.py",
           '"head" if _name(path[0]) == "fc" else "backbone"', '"head"',
           PRETRAINED + ("-k", "frozen_backbone"),
           breaks="--freeze-backbone trains the head alone"),
    Mutant("download_kept_when_hash_differs", "flaxres/weights.py",
           "if sha256 and digest.hexdigest() != sha256.lower():",
           "if False:", PRETRAINED + ("-k", "url"),
           breaks="a download that fails its sha256 is not cached"),
    Mutant("multistep_epoch_milestones_per_iteration", "train/optim.py",
           "return [int(m) * steps_per_epoch for m in milestones]",
           "return [int(m) for m in milestones]", SCHEDULES,
           breaks="multistep milestones count epochs"),
    Mutant("config_optimizer_no_weight_decay", "train/config.py",
           "optim.sgd(self.lr_schedule(steps_per_epoch), self.momentum, self.weight_decay,",
           "optim.sgd(self.lr_schedule(steps_per_epoch), self.momentum, 0.0,", TRAINING_PATH,
           breaks="Config.optimizer applies the weight decay"),
    Mutant("warmup_lr_not_divided", "train/optim.py",
           "return optax.constant_schedule(factor * base_lr)",
           "return optax.constant_schedule(base_lr)", SCHEDULES,
           breaks="warm-up runs at lr / 10"),
    Mutant("stem_without_maxpool", "flaxres/models.py",
           'return max_pool_3x3_s2(x) if self.stem == "imagenet" else x', "return x", MODELS,
           breaks="the ImageNet stem ends with its max-pool"),
    Mutant("linear_kernel_not_transposed", "flaxres/convert.py",
           '_FROM_TORCH = {"conv": (2, 3, 1, 0), "linear": (1, 0)}',
           '_FROM_TORCH = {"conv": (2, 3, 1, 0), "linear": (0, 1)}', CONVERT,
           breaks="the head's kernel converts (out, in) <-> (in, out)"),
    Mutant("table_takes_best_epoch", "bench/accuracy_table.py",
           '"final_acc": history[-1]["test_acc"]', '"final_acc": max(h["test_acc"] for h in history)',
           ("tests/test_accuracy_table.py",),
           breaks="the results table reports the last epoch, not the best"),
    Mutant("table_counts_a_seed_twice", "bench/accuracy_table.py",
           "if (seen := group[\"sources\"].setdefault((fw, run[\"seed\"]), name)) != name:",
           "if (seen := name) != name:", ("tests/test_accuracy_table.py",),
           breaks="the results table refuses a seed given twice"),
    Mutant("table_gap_by_students_t", "bench/accuracy_table.py",
           "stats.ttest_ind(ours, theirs, equal_var=False)", "stats.ttest_ind(ours, theirs)",
           ("tests/test_accuracy_table.py",),
           breaks="the gap's p-value is Welch's"),
    # Tests that bite, round two: the trainer's data path, initialisation, evaluation.
    Mutant("augment_key_fixed", "train/steps.py",
           "data.augment(jax.random.fold_in(state.key, state.step), x)",
           "data.augment(state.key, x)", AUGMENT,
           breaks="every step and epoch draws new crops and flips"),
    Mutant("augment_offsets_miss_8", "train/data.py",
           "jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)",
           "jax.random.randint(k_crop, (n, 2), 0, 2 * pad)", AUGMENT,
           breaks="crop offsets cover 0..8 on each axis, uniformly"),
    Mutant("augment_pads_edges", "train/data.py",
           "padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))",
           'padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")',
           AUGMENT, breaks="pixels outside the image are zeros"),
    Mutant("augment_flips_too_rarely", "train/data.py",
           "jax.random.bernoulli(k_flip, 0.5, (n,))", "jax.random.bernoulli(k_flip, 0.45, (n,))",
           AUGMENT, breaks="an image is flipped with p = 0.5"),
    Mutant("conv_init_fan_in", "flaxres/models.py",
           'variance_scaling(2.0, "fan_out", "normal")', 'variance_scaling(2.0, "fan_in", "normal")',
           INIT, breaks="convolutions start as torchvision's Kaiming normal, fan_out"),
    Mutant("conv_init_gain_1", "flaxres/models.py",
           'variance_scaling(2.0, "fan_out", "normal")', 'variance_scaling(1.0, "fan_out", "normal")',
           INIT, breaks="convolutions start with the ReLU gain"),
    Mutant("head_init_fan_out", "flaxres/models.py",
           'variance_scaling(1.0 / 3.0, "fan_in", "uniform")',
           'variance_scaling(1.0 / 3.0, "fan_out", "uniform")', INIT,
           breaks="the head starts as nn.Linear's uniform"),
    Mutant("eval_counts_a_padding_row", "train/steps.py",
           "valid = (start + jnp.arange(batch_size)) < num_valid",
           "valid = (start + jnp.arange(batch_size)) <= num_valid", EVAL,
           breaks="evaluation counts each test image once and no padding"),
    Mutant("eval_counts_padding_in_the_mean", "train/steps.py",
           '"count": metrics["count"] + valid.sum(),', '"count": metrics["count"] + batch_size,',
           EVAL, breaks="evaluation divides by the number of test images"),
    Mutant("centre_crop_floors", "flaxres/predict.py",
           "round((h - crop) / 2.0), round((w - crop) / 2.0)", "(h - crop) // 2, (w - crop) // 2",
           PRETRAINED + ("-k", "pixel_by_pixel"),
           breaks="prediction crops the centre as torchvision's CenterCrop rounds it"),
    Mutant("cifar100_python_coarse_labels", "train/data.py",
           'b"fine_labels", b"fine_label_names")', 'b"coarse_labels", b"fine_label_names")',
           ("tests/test_data.py", "-k", "cifar100"), breaks="CIFAR-100 trains on the fine labels"),
    Mutant("cifar100_binary_coarse_labels", "train/data.py",
           "rec[:, label_bytes - 1].astype(np.int32)", "rec[:, 0].astype(np.int32)",
           ("tests/test_data.py", "-k", "cifar100"),
           breaks="CIFAR-100's binary records give the fine label"),
    Mutant("loss_summed", "train/steps.py",
           "return cross_entropy(logits, y, label_smoothing).mean(), (logits, stats, act_std)",
           "return cross_entropy(logits, y, label_smoothing).sum(), (logits, stats, act_std)", ("tests/test_steps.py",),
           breaks="the trainer minimises the batch-mean cross-entropy"),
    Mutant("default_mean_bgr", "flaxres/registry.py",
           "CIFAR_MEAN = (0.4914, 0.4822, 0.4465)", "CIFAR_MEAN = (0.4465, 0.4822, 0.4914)",
           ("tests/test_data.py", "-k", "real_shared"),
           breaks="the default normalisation is the data's, in RGB order"),
    Mutant("label_smoothing_ignored", "train/steps.py", "    if not label_smoothing:",
           "    if True:", ("tests/test_steps.py",),
           breaks="--label-smoothing smooths the training targets as PyTorch does"),
    Mutant("norm_weight_decay_on_every_parameter", "train/optim.py",
           'return "norm" if norm and n[:-1] in norm_layers else "other"', 'return "other"',
           ("tests/test_recipe_options.py", "-k", "groups"),
           breaks="--norm-weight-decay applies to BatchNorm's parameters"),
    Mutant("ema_averages_its_first_update", "train/steps.py",
           "copy = previous <= self.copy_until", "copy = previous < self.copy_until",
           ("tests/test_recipe_options.py", "-k", "ema"),
           breaks="the EMA copies the weights at its first update after the warm-up"),
    Mutant("processes_read_the_same_rows", "train/input.py",
           "self._first = shard.index * self._local", "self._first = 0",
           ("tests/test_input.py", "-k", "share"),
           breaks="each process reads its own rows of every global batch"),
    Mutant("onnx_shortcut_channels_first", "flaxres/export.py",
           "kernel[before + np.arange(channels), np.arange(channels)] = 1",
           "kernel[np.arange(channels), np.arange(channels)] = 1", EXPORT,
           breaks="the ONNX option-A shortcut's kernel places each channel after the zeros "
           "before it"),
    Mutant("onnx_input_row_channels_outer", "flaxres/export.py",
           "ascontiguousarray(w.transpose(0, 2, 3, 1)", "ascontiguousarray(w.transpose(0, 2, 1, 3)",
           EXPORT, breaks="the ONNX stem kernel laid along an NHWC row runs over pixels, then "
           "channels"),
    Mutant("onnx_segment_reads_nhwc", "flaxres/export.py",
           "inputs_as_nchw=None if first else [0]", "inputs_as_nchw=None", SEGMENTS,
           breaks="each ONNX segment after the first reads the NCHW activations its predecessor "
           "writes"),
    Mutant("onnx_seam_transposes_kept", "flaxres/export.py",
           "[first[p] for p in perm] != list(range(len(perm)))",
           "[p for p in perm] != list(range(len(perm)))", SEGMENTS,
           breaks="the Transpose pairs at the seams of a segmented ONNX conversion cancel"),
]


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f]


def scratch_copy(dest: Path) -> None:
    """The repository's tracked files as they are in the working tree, and the built oneDNN
    extension (untracked; without it the oneDNN tests would skip and every mutant there survive)."""
    built = [p.relative_to(ROOT) for p in (ROOT / "flaxres" / "cpu").glob("_onednn*.so")]
    for rel in [*_tracked_files(), *built]:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def mutated(m: Mutant, text: str) -> str:
    """``text`` (of ``m.file``) with the mutant's bug in it."""
    if text.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: its snippet occurs {text.count(m.old)} times in "
                         f"{m.file} (expected once); update tests/mutate.py")
    return text.replace(m.old, m.new)


def apply(m: Mutant, tree: Path) -> str:
    """Writes the mutant into ``tree``; returns the original text to restore it."""
    path = tree / m.file
    text = path.read_text()
    path.write_text(mutated(m, text))
    return text


def run_tests(m: Mutant, tree: Path, timeout: int, xla_cache: Path) -> tuple[bool, str]:
    """(caught, which test): pytest with -x in the scratch tree, one thread (the other cores run
    other mutants); the mutants share one XLA compilation cache (a mutant's changed programs
    compile anew, the rest are reused)."""
    cmd = [sys.executable, "-m", "pytest", "-n0", "-x", "-q", "-p", "no:cacheprovider",
           f"--basetemp={tree.with_name(tree.name + '-tmp')}", "--no-header", "-rfE", *m.tests]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(xla_cache), OMP_NUM_THREADS="1",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false")
    try:
        out = subprocess.run(cmd, check=False, cwd=tree, env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.MULTILINE)
    if out.returncode == 0:
        return False, "all tests passed"
    return True, failed[0] if failed else f"pytest exit {out.returncode}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/mutate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="mutants tested at once, each on one core (default: one per core)")
    args = p.parse_args(argv)
    names = [m.name for m in MUTANTS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows {len(names)}")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: at least one mutant must run at a time")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<42} {m.file:<20} breaks: {m.breaks}\n{'':<42} tests: "
                  f"{' '.join(m.tests)}")
        return 0
    jobs = min(args.jobs, len(chosen))  # one scratch copy and one thread each
    for m in chosen:  # every snippet found before any mutant runs
        mutated(m, (ROOT / m.file).read_text())
    with (tempfile.TemporaryDirectory(prefix="flaxres-mutate-") as tmp,
          tempfile.TemporaryDirectory(prefix="flaxres-mutate-xla-") as xla_cache):
        if (ROOT.parent / "shared").is_dir():  # the data copy the tests find beside the checkout
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        trees: queue.Queue[Path] = queue.Queue()
        for i in range(jobs):
            (tree := Path(tmp) / str(i)).mkdir()
            scratch_copy(tree)
            trees.put(tree)

        def run(m: Mutant) -> bool:
            tree = trees.get()
            t0 = time.perf_counter()
            original = apply(m, tree)
            try:
                caught, where = run_tests(m, tree, args.timeout, Path(xla_cache))
            finally:
                (tree / m.file).write_text(original)
                trees.put(tree)
            verdict = "caught by" if caught else f"SURVIVED ({m.breaks}):"
            print(f"{m.name:<42} {verdict} {where} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            return caught

        with ThreadPoolExecutor(jobs) as pool:
            caught = list(pool.map(run, chosen))
    survived = [m.name for m, c in zip(chosen, caught) if not c]
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants caught"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
