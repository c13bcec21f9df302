"""``flawscope demo``: the whole workflow on the embedded synthetic dataset.

Generates an MVTec-style dataset (a textured surface and a simple object, with pixel masks),
fits each requested detector per category (by default only the default detector, PatchCore:
no training loop, so the demo takes about a minute or two on two CPU cores), evaluates on the
test split and writes one HTML report per category with the models side by side
(``models=("ncae", "patchcore")`` compares the autoencoder too, for several more minutes).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from flawscope.data.dataset import open_dataset
from flawscope.data.synthetic import CATEGORIES, generate_dataset
from flawscope.evaluation import evaluate
from flawscope.fastruntime import select_runtime
from flawscope.io import atomic_write_text
from flawscope.pipeline import DEFAULT_MODEL, Inspector
from flawscope.report import write_report

#: demo-sized options per detector (moderate inputs and short training on CPU)
DEMO_OPTIONS: dict[str, dict] = {
    "ncae": {"image_size": 96, "epochs": 25},
    "conv-ae": {"image_size": 96, "epochs": 25},
    "patchcore": {"image_size": 128, "coreset_ratio": 0.1},
    "padim": {"image_size": 128, "n_features": 100},
}
#: demo dataset size: 100 good training images give PatchCore 100 leave-one-out calibration
#: scores, enough to certify the default 1 % false-reject rate (99 needed)
DEMO_DATA = {"n_train": 100, "n_test_good": 30, "n_test_per_defect": 8}


@dataclass
class DemoResult:
    """What the demo wrote."""

    out_dir: Path
    models: list[Path]
    reports: list[Path]
    summary: Path
    test_images: Path  # the test images of the last category, for ``predict``

    def next_steps(self, prog: str = "flawscope") -> str:
        """Where everything is and the exact commands to try next (``prog``: how to call
        flawscope, e.g. ``.venv/bin/flawscope``)."""
        model = shlex.quote(str(self.models[-1]))
        test_dir = shlex.quote(str(self.test_images))
        lines = ["models:", *(f"  {m}" for m in self.models),
                 "reports (open in a browser):", *(f"  {r}" for r in self.reports),
                 f"metrics: {self.summary}",
                 "next, serve a model and open http://127.0.0.1:8000/ to inspect images:",
                 f"  {prog} serve {model}",
                 "or score a folder from the command line:",
                 f"  {prog} predict {model} {test_dir}"]
        return "\n".join(lines)


def run_demo(
    out_dir: str | Path,
    models: list[str] | tuple[str, ...] = (DEFAULT_MODEL,),
    categories: tuple[str, ...] = CATEGORIES,
    device: str = "auto",
    progress: bool = True,
    options: dict[str, dict] | None = None,
    data: dict | None = None,
) -> DemoResult:
    """Run the demo; returns the paths of the models, reports and metrics it wrote.

    ``options`` (per model) and ``data`` (generator sizes) replace :data:`DEMO_OPTIONS` and
    :data:`DEMO_DATA`.
    """
    out = Path(out_dir)
    options = DEMO_OPTIONS if options is None else options
    data_root = generate_dataset(out / "data", categories, **(DEMO_DATA if data is None else data))
    reports, model_files = [], []
    summary = {}
    for cat in categories:
        dataset = open_dataset(data_root / cat, "mvtec")
        results = []
        for name in models:
            print(f"[{cat}] fitting {name} on {len(dataset.train)} good images", file=sys.stderr)
            opts = {"device": device, "progress": progress, **options.get(name, {})}
            inspector = Inspector.train(dataset, name, **opts)
            model_file = out / "models" / f"{cat}-{name}.safetensors"
            inspector.save(model_file)
            # as `flawscope fit` leaves it: the cached onnxruntime graph (flawscope.fastruntime),
            # which the evaluation below and the printed predict / serve commands then use
            select_runtime(inspector, model_file, "auto", prepare_missing=True)
            model_files.append(model_file)
            result = evaluate(inspector, dataset, progress=progress)
            results.append(result)
            summary[f"{cat}/{name}"] = {
                k: result.metrics.get(k) for k in ("image_auroc", "f1", "pixel_auroc", "aupro")
            }
            print(f"[{cat}] {name}: image AUROC {result.metrics['image_auroc']:.3f}, "
                  f"F1 {result.metrics['f1']:.3f}", file=sys.stderr)
        reports.append(write_report(out / "report" / cat, results,
                                    title=f"flawscope demo: synthetic {cat}"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return DemoResult(out, model_files, reports, out / "summary.json",
                      data_root / categories[-1] / "test")
