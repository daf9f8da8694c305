"""Named training recipes for ``python -m train.cifar`` and ``python -m train.imagenet``
(``--recipe NAME``): one small file each, whose ``RECIPE`` dict gives Config fields that the run
takes as its defaults."""
