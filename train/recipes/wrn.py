"""Zagoruyko & Komodakis 2016's CIFAR recipe for the Wide ResNets: SGD with Nesterov momentum 0.9,
lr 0.1 divided by 5 at epochs 60, 120 and 160 of 200, weight decay 5e-4, batch 128.

    python -m train.cifar --recipe wrn --arch wrn28_10 --data-dir DATA [--dropout 0.3]
"""

RECIPE = {"epochs": 200, "lr": 0.1, "schedule": "multistep", "milestones": (60, 120, 160),
          "lr_gamma": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
          "batch_size": 128}
