"""The classifier's option choices, importable without numpy or torch.

The command line builds its parser from these (``flawscope classify --help`` must stay fast),
and the library checks its own tables against them (``tests/test_choices.py``), so a choice
exists in one place: :data:`OPTIMIZER_NAMES` are the keys of
:data:`flawscope.classify.config.OPTIMIZERS`, :data:`RECIPE_NAMES` of its ``RECIPES``, and
:data:`TTA_MODES` the test-time augmentations of :mod:`flawscope.classify.tta`.
"""

from __future__ import annotations

#: optimizers of a classifier training run
OPTIMIZER_NAMES: tuple[str, ...] = ("adadelta", "adam", "adamw", "radam", "sgd")
#: named training recipes (``auto`` chooses one of them)
RECIPE_NAMES: tuple[str, ...] = ("document", "cpu")
#: test-time augmentations: none, horizontal + vertical flips, the eight dihedral views
TTA_MODES: tuple[str, ...] = ("none", "flips", "dihedral")
