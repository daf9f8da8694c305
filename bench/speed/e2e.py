"""End to end: each framework's idiomatic input pipeline feeding its train step, from the same
decoded uint8 CIFAR arrays (decoding is cached once and not timed)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.speed import torch_runner
from bench.speed.jax_runner import LR, MOMENTUM, WEIGHT_DECAY, JaxRunner
from train import data, steps


def flaxres_epoch(jb: JaxRunner, images: np.ndarray, labels: np.ndarray, batch: int,
                  n_steps: int, mean, std) -> dict:
    """The trainer's step: the dataset on the device, each step gathers its batch, augments
    (pad-4 random crop + flip) and normalises it inside the jitted step."""
    n_total = len(labels)
    rep = steps.replicated(jb.mesh)
    step = steps.jit_train_step(jb.mesh, jb.train_def, jb.tx, batch_size=batch, mean=mean,
                                std=std, augment=True)
    dimgs, dlabels = jax.device_put(images, rep), jax.device_put(labels, rep)
    state = jax.tree.map(jnp.copy, jb.initial_state)  # the step donates its state
    metrics = jax.device_put(steps.zero_metrics(), rep)
    perm = data.epoch_permutation(jax.random.PRNGKey(0), 0, n_total)
    per_epoch = n_total // batch
    t0 = time.perf_counter()
    state, metrics = step(state, metrics, perm, dimgs, dlabels, np.int32(0))
    metrics["count"].block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, n_steps + 1):
        state, metrics = step(state, metrics, perm, dimgs, dlabels, np.int32(i % per_epoch))
    metrics["count"].block_until_ready()
    dt = time.perf_counter() - t0
    return {"img_s": n_steps * batch / dt, "seconds": dt, "compile_s": compile_s,
            "epoch_s_est": n_total / (n_steps * batch / dt)}


def torch_epoch(module: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int,
                n_steps: int, mean, std, workers: int, dev: str) -> dict:
    """``DataLoader`` + torchvision transforms over PIL images, as the reference seeds train;
    batches are copied to ``dev`` as the seeds do."""
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean, std)])

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return tf(Image.fromarray(images[i])), int(labels[i])

    module = module.to(dev)
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    module.train()
    loader = torch.utils.data.DataLoader(Images(), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    t0 = time.perf_counter()
    first_s, done = 0.0, 0
    for i, (xb, yb) in enumerate(loader):
        if i == 1:  # the first batch pays for worker start-up, like jit compilation
            torch_runner.sync(dev)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(xb), yb).backward()
        opt.step()
        if i >= 1:
            done += batch
        if i >= n_steps:
            break
    torch_runner.sync(dev)
    dt = time.perf_counter() - t0
    del loader
    return {"img_s": done / dt, "seconds": dt, "compile_s": first_s,
            "epoch_s_est": len(labels) / (done / dt), "workers": workers}


def run(jb: JaxRunner, torch_module: torch.nn.Module | None, *, data_dir: str, batch: int,
        images_to_time: int, workers: int) -> dict:
    """Both pipelines over ``images_to_time`` training images (0 = the whole epoch)."""
    from train.config import CIFAR_MEAN, CIFAR_STD

    arrays = data.load_arrays("cifar10", data_dir)
    imgs, labels = arrays.train_images, arrays.train_labels
    n_total = len(labels)
    n_steps = max(2, min(images_to_time or n_total, n_total) // batch)
    res = {"images": n_steps * batch, "of_epoch": n_total,
           "flaxres-jit": flaxres_epoch(jb, imgs, labels, batch, n_steps, CIFAR_MEAN, CIFAR_STD)}
    if torch_module is not None:
        res["torch-eager"] = torch_epoch(torch_module, imgs, labels, batch, n_steps, CIFAR_MEAN,
                                         CIFAR_STD, workers, torch_runner.device())
    return res
