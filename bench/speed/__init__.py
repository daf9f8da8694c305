"""Framework speed comparison: flaxres (jax.jit) vs PyTorch eager, channels_last and torch.compile.

    python -m bench.speed --arch resnet20,resnet56,resnet18_cifar --batch-size 128 \
        [--precision fp32|bf16] [--matmul-precision highest|tf32] [--threads N] [--reps 10] \
        [--json out.json] [--md out.md] [--plot out.png] \
        [--skip-e2e | --data-dir ../shared/data/cifar10-jpeg.tar.gz]

For each architecture, with the same weights in both frameworks (flaxres weights exported with
``flaxres.convert.to_torch``; eval logits compared and reported), the same batch already in device
memory, the same kind of device (PyTorch uses CUDA when JAX runs on a GPU), the same dtype, the
same matmul/convolution precision policy and the same number of CPU threads:

* train step (forward + backward + SGD update with momentum and weight decay; BatchNorm in train
  mode) and inference (eval mode) throughput in img/s. flaxres runs the trainer's own jitted step
  (``train.steps``, ``train.optim.sgd``), which also gathers and normalises the uint8 batch on the
  device; PyTorch gets the same batch normalised beforehand. Compile / warm-up time is measured
  separately; then ``--reps`` timed repetitions; median and spread (min..max, IQR); every rep
  ends with a device sync (``block_until_ready``, ``torch.cuda.synchronize``). Each framework runs
  in a fresh process of its own, one after the other (on 2 cores, interleaving torch's and XLA's
  thread pools in one process collapsed torch's training throughput ~8x); ``--interleave`` times
  them in one process, one rep of each in turn, so that load changes on a shared machine hit all
  alike;
* model FLOPs per image (2 x multiply-adds of convs and the classifier, counted from the jaxpr;
  a train step counts 3x the forward) and achieved FLOP/s as a % of the peak measured in the same
  run (best of a large fp32 / bf16 matmul in JAX and in torch);
* end to end (unless ``--skip-e2e``): each framework's idiomatic input pipeline feeding the train
  step: flaxres is the trainer's step over the dataset on the device (gather, pad-4 random crop +
  flip, normalise inside the jitted step); PyTorch uses ``DataLoader`` + torchvision
  ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` over PIL images, as the
  reference CIFAR scripts train. Both start from the same decoded uint8 arrays (decoding is cached
  once and not timed). ``--e2e-images`` limits the measured part of the epoch (the table says how
  many).

Precision: ``--matmul-precision`` sets the same policy in both frameworks and the results record
it (see :mod:`bench.speed.precision`): ``highest`` = true fp32 products (TF32 off in both),
``tf32`` = TF32 on in both where the GPU has it; ``--precision bf16`` is bf16 compute.

Threads: ``--threads N`` sets torch's intra-op threads and OMP/MKL threads to N, turns on XLA's
multi-threaded Eigen (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=true``, before jax is imported)
and, when N is below the core count, pins the process to N cores (XLA:CPU sizes its thread pool
by the cores it may use); the default is every core.

Modules: ``cli`` (flags, the driver, processes), ``threads``, ``precision``, ``timing``, ``flops``,
``jax_runner``, ``torch_runner``, ``e2e``, ``report``. Importing this package imports neither jax
nor torch, so the thread settings can still take effect.
"""
