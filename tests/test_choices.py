"""The classifier's choice lists (flawscope.choices, torch-free for the parser) are the
library's own tables, and the library's option rules hold from Python as from the CLI."""

from __future__ import annotations

from flawscope import choices
from flawscope.classify.config import OPTIMIZERS, RECIPES, ClassifierConfig
from flawscope.cli import build_parser


def test_choice_lists_are_the_library_tables():
    assert set(choices.OPTIMIZER_NAMES) == set(OPTIMIZERS)
    assert set(choices.RECIPE_NAMES) == set(RECIPES)
    from flawscope.classify import tta

    assert tta.TTA_MODES is choices.TTA_MODES
    for mode in choices.TTA_MODES:  # every mode validates
        ClassifierConfig.from_recipe("cpu", tta=mode).validate()


def test_parser_offers_exactly_the_library_choices():
    sub = build_parser()._subparsers._group_actions[0].choices["classify"]
    fit = sub._subparsers._group_actions[0].choices["fit"]
    by_dest = {a.dest: a for a in fit._actions}
    assert tuple(by_dest["tta"].choices) == choices.TTA_MODES
    assert tuple(by_dest["recipe"].choices) == ("auto", *choices.RECIPE_NAMES)


def test_another_optimizer_brings_its_own_rate_in_python_as_in_the_cli():
    cpu = ClassifierConfig.from_recipe("cpu")
    assert cpu.optimizer == "adamw" and cpu.learning_rate is not None
    sgd = ClassifierConfig.from_recipe("cpu", optimizer="sgd")
    assert sgd.learning_rate is None and sgd.weight_decay is None  # SGD's own defaults
    assert ClassifierConfig.from_recipe("cpu", optimizer="sgd",
                                        learning_rate=0.05).learning_rate == 0.05
    same = ClassifierConfig.from_recipe("cpu", optimizer="AdamW")  # the recipe's: kept
    assert same.learning_rate == cpu.learning_rate
