"""``flawscope demo``: the whole workflow on the embedded synthetic dataset.

Generates an MVTec-style dataset (a textured surface and a simple object, with pixel masks),
fits each requested detector per category, evaluates on the test split and writes one HTML
report per category with the models side by side. Sized to finish in a few minutes on two CPU
cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flawscope.data.dataset import open_dataset
from flawscope.data.synthetic import CATEGORIES, generate_dataset
from flawscope.evaluation import evaluate
from flawscope.modelfile import atomic_write_text
from flawscope.pipeline import Inspector
from flawscope.report import write_report

#: demo-sized options per detector (moderate inputs and short training on CPU)
DEMO_OPTIONS: dict[str, dict] = {
    "ncae": {"image_size": 96, "epochs": 25},
    "conv-ae": {"image_size": 96, "epochs": 25},
    "patchcore": {"image_size": 128, "coreset_ratio": 0.1},
    "padim": {"image_size": 128, "n_features": 100},
}
#: demo dataset size: enough good images that the calibration split (15 %) means something
DEMO_DATA = {"n_train": 150, "n_test_good": 30, "n_test_per_defect": 8}


def run_demo(
    out_dir: str | Path,
    models: list[str] | tuple[str, ...] = ("ncae", "patchcore"),
    categories: tuple[str, ...] = CATEGORIES,
    device: str = "auto",
    progress: bool = True,
    options: dict[str, dict] | None = None,
    data: dict | None = None,
) -> list[Path]:
    """Run the demo; returns the report paths.

    ``options`` (per model) and ``data`` (generator sizes) replace :data:`DEMO_OPTIONS` and
    :data:`DEMO_DATA`.
    """
    out = Path(out_dir)
    options = DEMO_OPTIONS if options is None else options
    data_root = generate_dataset(out / "data", categories, **(DEMO_DATA if data is None else data))
    reports = []
    summary = {}
    for cat in categories:
        dataset = open_dataset(data_root / cat, "mvtec")
        results = []
        for name in models:
            print(f"[{cat}] fitting {name} on {len(dataset.train)} good images", file=sys.stderr)
            opts = {"device": device, "progress": progress, **options.get(name, {})}
            inspector = Inspector.train(dataset, name, **opts)
            inspector.save(out / "models" / f"{cat}-{name}.safetensors")
            result = evaluate(inspector, dataset)
            results.append(result)
            summary[f"{cat}/{name}"] = {
                k: result.metrics.get(k) for k in ("image_auroc", "f1", "pixel_auroc", "aupro")
            }
            print(f"[{cat}] {name}: image AUROC {result.metrics['image_auroc']:.3f}, "
                  f"F1 {result.metrics['f1']:.3f}", file=sys.stderr)
        reports.append(write_report(out / "report" / cat, results,
                                    title=f"flawscope demo: synthetic {cat}"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return reports
