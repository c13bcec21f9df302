"""Dataset layout names and folder-name conventions.

Plain constants, importable without numpy or torch: the command line builds its help from
them (``flawscope fit --help`` must stay fast), and :mod:`flawscope.data.dataset` reads and
detects the layouts they describe.
"""

from __future__ import annotations

#: layout names, in the order auto-detection tries them
LAYOUTS: tuple[str, ...] = ("casting", "magnetic-tile", "mvtec", "folder")

#: folder names (any case) that hold images of good parts
GOOD_NAMES: tuple[str, ...] = ("good", "ok", "normal")

#: usual folder names (any case) for defect images; any other non-good folder of the folder
#: layout is a defect type too, these only sharpen error messages
DEFECT_NAMES: tuple[str, ...] = ("ng", "bad", "defect", "anomaly", "defective", "nok")

#: what each layout expects, one line each (used in error messages)
LAYOUT_EXPECTS: dict[str, str] = {
    "casting": "train/ok_front/, train/def_front/, test/ok_front/, test/def_front/",
    "magnetic-tile": "MT_<type>/Imgs/<name>.jpg (MT_Free = good), mask <name>.png beside it",
    "mvtec": "<category>/train/good/ and <category>/test/<type>/, masks in "
    "<category>/ground_truth/<type>/ (DATA: one category or a folder of them)",
    "folder": f"a good-parts folder ({'/, '.join(GOOD_NAMES)}/, any case) plus one folder "
    "per defect type (e.g. ng/), or just a folder of good images",
}

#: the layouts with example trees, for ``flawscope fit --help``
LAYOUT_HELP = """\
dataset layouts (DATA; auto-detected, or force one with --format):
  folder         DATA/ok/*.png  DATA/ng/*.png     good folder: good, ok or normal (any case);
                 DATA/good/ DATA/scratch/ ...     every other folder is a defect type (ng, bad,
                 DATA/masks/scratch/ (optional)   defect, ...); or DATA is just a folder of good
                 DATA/*.png                       images. Goods: 70 % train / 30 % test by
                                                  file-name hash; defects: test
  mvtec          DATA/train/good/  DATA/test/good/  DATA/test/<type>/
                 DATA/ground_truth/<type>/<name>_mask.png; DATA may hold several categories
  casting        DATA/train/ok_front/ DATA/train/def_front/ DATA/test/ok_front/ ...
  magnetic-tile  DATA/MT_Free/Imgs/*.jpg  DATA/MT_<type>/Imgs/*.jpg (+ <name>.png masks)

without a dataset folder: --good DIR [--defects DIR], e.g.
  flawscope fit --good photos/ok --defects photos/ng -o part.safetensors
"""
