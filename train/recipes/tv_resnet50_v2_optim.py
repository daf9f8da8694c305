"""The optimisation half of torchvision's newer ResNet-50 recipe (IMAGENET1K_V2, 80.9% top-1):
SGD, lr 0.5 for a batch of 1024, 600 epochs of cosine decay after a 5-epoch linear warm-up from
lr x 0.01, label smoothing 0.1, weight decay 2e-5 but none on BatchNorm, and an EMA of the
weights every 32 steps. The EMA decay is the per-update one torchvision's trainer derives from
its --model-ema-decay 0.99998 for this batch and length (1 - 2e-5 x 1024 x 32 / 600).

The recipe's augmentations (TrivialAugment, mixup, cutmix, random erasing) and its 176-px
training crop are not part of flaxres's trainer, so this recipe does not reach that accuracy.

    python -m train.imagenet --recipe tv_resnet50_v2_optim --data-dir DATA --workdir runs/r50v2
"""

RECIPE = {"epochs": 600, "batch_size": 1024, "lr": 0.5, "schedule": "cosine", "warmup": "on",
          "warmup_epochs": 5, "warmup_method": "linear", "warmup_factor": 0.01,
          "label_smoothing": 0.1, "weight_decay": 2e-5, "norm_weight_decay": 0.0,
          "ema_decay": 1 - 2e-5 * 1024 * 32 / 600, "ema_steps": 32}
