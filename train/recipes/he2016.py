"""He et al. 2016's CIFAR recipe (Section 4.2), the trainer's defaults: SGD with momentum 0.9,
lr 0.1 divided by 10 at iterations 32k and 48k of 64k, weight decay 1e-4, batch 128.

    python -m train.cifar --recipe he2016 --arch resnet56 --data-dir DATA
"""

RECIPE = {"steps": 64000, "lr": 0.1, "schedule": "paper", "momentum": 0.9, "nesterov": False,
          "weight_decay": 1e-4, "batch_size": 128}
