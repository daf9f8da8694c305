"""torchvision's ResNet-50 reference recipe (IMAGENET1K_V1, 76.1% top-1), the defaults of
``python -m train.imagenet``: SGD with momentum 0.9, lr 0.1 for a batch of 256, weight decay 1e-4,
90 epochs, lr / 10 after epochs 30 and 60.

    python -m train.imagenet --recipe tv_resnet50 --data-dir DATA --workdir runs/r50
"""

RECIPE = {"epochs": 90, "batch_size": 256, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
          "schedule": "multistep", "milestones": (30, 60), "lr_gamma": 0.1, "warmup": "off"}
