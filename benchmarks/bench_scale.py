"""Scaling out on this machine: Ray Data scoring (1 vs 2 workers, vs plain predict at equal
cores, a worker killed mid-run) and ``fit-many`` on Ray vs one fit after another.

Setup (not timed): a generated archive of ``--images`` images (synthetic ``tile``, 128 px)
and a model fitted on its training images (``--model``, default patchcore at 128 px).

Scoring, in this process, with a local Ray instance of ``--cpus`` CPUs already running (as a
cluster would be): ``score_archive`` with 1 worker (1 CPU, 1 torch thread) and 2 workers
(1 CPU each); plain ``predict`` is ``load_any_model`` + ``inspector.predict`` on every path +
the CSV rows, with torch on ``--cpus`` threads (the comparison at equal cores) and on 1
thread. CPU seconds (this process for predict; the map actors' processes, sampled from /proc,
for Ray) show the work apart from what other jobs on the machine take. Wall times include
loading the model (in each Ray worker: its start too) and writing the rows. Then the same
2-worker run with one worker killed (SIGKILL) after a quarter of the images, and, end to
end, the CLI
``flawscope predict --engine ray`` that starts its own Ray instance.

fit-many: ``--fits`` rows (tile / washer, seeds 0, 1, ...) through the CLI
``flawscope fit-many MANIFEST --engine local`` (one after another, torch on every core; and
again with ``OMP_NUM_THREADS=1``) and ``--engine ray`` (one task per model, 1 CPU each;
starts its own Ray instance), wall time of the commands.

    python benchmarks/bench_scale.py                              # the figures in the docs
    python benchmarks/bench_scale.py --images 200 --fits 2 --json scale.json   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, print_table, write_json

#: targets of issue 32
TARGET_SPEEDUP = 1.6  # 2 workers / 1 worker
TARGET_VS_PREDICT = 0.9  # 2 workers / plain predict at equal cores
TARGET_FIT_RATIO = 0.6  # fit-many on Ray wall / one after another


def make_archive(work: Path, n_images: int, image_size: int) -> Path:
    from flawscope.data.synthetic import generate_dataset

    per_defect = max(1, n_images // 20)  # tile has 4 defect types: 20 % defects
    return generate_dataset(work / "archive", ["tile"], n_train=60,
                            n_test_good=n_images - 4 * per_defect,
                            n_test_per_defect=per_defect, image_size=image_size, seed=0)


def fit_model(data: Path, name: str, image_size: int, out: Path) -> Path:
    from flawscope.data.dataset import open_dataset
    from flawscope.pipeline import Inspector

    inspector = Inspector.train(open_dataset(data / "tile"), name, image_size=image_size,
                                device="cpu", progress=False)
    return inspector.save(out)


def map_workers(raylet: int) -> list[int]:
    """Pids of the Ray Data map actors of this Ray instance (children of its raylet)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("PPid:")), -1)
        if ppid == raylet and cmd.startswith(b"ray::MapWorker"):
            pids.append(int(entry))
    return pids


def time_predict(model: Path, paths: list[str]) -> tuple[float, float]:
    """Plain predict in this process: load, score every image, CSV rows; (wall, CPU) s."""
    from flawscope.pipeline import ROW_COLUMNS
    from flawscope.runtime import load_any_model

    c0, t0 = sum(os.times()[:2]), time.perf_counter()
    inspector = load_any_model(model, device="cpu")
    preds = inspector.predict(paths)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(ROW_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(p.to_row() for p in preds)
    return time.perf_counter() - t0, sum(os.times()[:2]) - c0


class ActorCPU:
    """CPU seconds used by the map actors of a run (sampled from /proc twice a second)."""

    def __init__(self, raylet: int) -> None:
        self.raylet, self.seen, self.stop = raylet, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.stop.is_set():
            for pid in map_workers(self.raylet):
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                used = (int(fields[11]) + int(fields[12])) / tick
                self.seen[pid] = max(used, self.seen.get(pid, 0.0))
            self.stop.wait(0.5)

    def __enter__(self) -> ActorCPU:
        self.before = {pid: 0.0 for pid in map_workers(self.raylet)}  # idle ones from earlier
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return sum(v for p, v in self.seen.items() if p not in self.before)


def wait_idle(timeout: float = 30.0) -> None:
    """Until the actors of the previous run have given their CPUs back."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.5)


def check_once(out: Path, n: int) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["path", "error"])
    paths = table.column("path").to_pylist()
    errors = sum(e is not None for e in table.column("error").to_pylist())
    return {"rows": len(paths), "unique": len(set(paths)), "errors": errors,
            "every_image_once": len(paths) == len(set(paths)) == n and errors == 0}


def run(cmd: list[str], **env_vars: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env_vars}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done


def bench_scoring(args: argparse.Namespace, work: Path) -> list[dict]:
    import ray
    import torch

    from flawscope.data.images import expand_images
    from flawscope.scale.batch import score_archive
    from flawscope.scale.cluster import ray_session

    data = make_archive(work, args.images, args.image_size)
    folder = data / "tile" / "test"
    paths = [str(p) for p in expand_images([folder])]
    n = len(paths)
    model = fit_model(data, args.model, args.image_size, work / "model.safetensors")
    print(f"{n} images in {folder}; {args.model} model at {args.image_size} px", file=sys.stderr)

    rows = []
    for threads in sorted({1, args.cpus}):
        torch.set_num_threads(threads)
        t, cpu = time_predict(model, paths)
        rows.append({"run": f"predict, 1 process, {threads} torch thread(s)", "workers": 1,
                     "cpus": threads, "images": n, "wall_s": t, "images_per_s": n / t,
                     "cpu_s": cpu})
    t0 = time.perf_counter()
    with ray_session(num_cpus=args.cpus):  # a local instance, as flawscope starts it
        ray_start = time.perf_counter() - t0
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        for workers in (1, 2):
            out = work / f"ray{workers}.parquet"
            wait_idle()
            with ActorCPU(raylet) as used:
                s = score_archive(model, [str(folder)], out, workers=workers, device="cpu")
            rows.append({"run": f"ray, {workers} worker(s) x 1 CPU, running instance",
                         "workers": workers, "cpus": workers, "images": n,
                         "wall_s": s.seconds, "images_per_s": n / s.seconds,
                         "cpu_s": used.seconds, **check_once(out, n)})
        killed: list[int] = []

        def kill_one(summary) -> None:
            if not killed and summary.done >= n // 4:
                victims = map_workers(raylet)
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    killed.append(summary.done)

        out = work / "killed.parquet"
        wait_idle()
        s = score_archive(model, [str(folder)], out, workers=2, device="cpu", progress=kill_one)
        rows.append({"run": "ray, 2 workers, one SIGKILLed at 25 %", "workers": 2, "cpus": 2,
                     "images": n, "wall_s": s.seconds, "images_per_s": n / s.seconds,
                     "killed_at": killed[0] if killed else None, **check_once(out, n)})
    out = work / "cli.parquet"
    t, _ = run([sys.executable, "-m", "flawscope", "predict", str(model), str(folder),
                "--engine", "ray", "-o", str(out), "--device", "cpu"])
    rows.append({"run": "CLI predict --engine ray (starts Ray), 2 workers", "workers": 2,
                 "cpus": 2, "images": n, "wall_s": t, "images_per_s": n / t,
                 **check_once(out, n)})
    base = next(r for r in rows if r["run"].startswith("predict") and r["cpus"] == args.cpus)
    one = next(r for r in rows if r["run"].startswith("ray, 1 worker"))
    for r in rows:
        r["vs_predict"] = r["images_per_s"] / base["images_per_s"]
        r["vs_1_worker"] = r["images_per_s"] / one["images_per_s"]
        if "cpu_s" in r:
            r["cpu_ms_per_image"] = 1000 * r["cpu_s"] / n
    rows.append({"run": f"(ray.init of a local instance: {ray_start:.1f} s)"})
    return rows


def bench_fit_many(args: argparse.Namespace, work: Path) -> list[dict]:
    from flawscope.data.synthetic import generate_dataset

    data = generate_dataset(work / "fitdata", ["tile", "washer"], n_train=args.fit_train,
                            n_test_good=10, n_test_per_defect=3, image_size=128, seed=0)
    manifest = work / "parts.csv"
    lines = ["name,data,output,model,image_size,seed"]
    for i in range(args.fits):
        cat = ("tile", "washer")[i % 2]
        lines.append(f"part-{i},{data / cat},models/part-{i}.safetensors,{args.fit_model},"
                     f"{args.fit_image_size},{i // 2}")
    manifest.write_text("\n".join(lines) + "\n")
    rows = []
    for engine, env, label in (
        ("local", {}, f"fit-many --engine local (torch on {os.cpu_count()} threads)"),
        ("local", {"OMP_NUM_THREADS": "1"}, "fit-many --engine local, OMP_NUM_THREADS=1"),
        ("ray", {}, "fit-many --engine ray (starts Ray), 1 CPU per model"),
    ):
        t, done = run([sys.executable, "-m", "flawscope", "fit-many", str(manifest), "--engine",
                       engine, "--json", "--device", "cpu"], **env)
        results = json.loads(done.stdout)
        rows.append({"run": label, "models": len(results),
                     "ok": sum(r["status"] == "ok" for r in results), "wall_s": t,
                     "sum_fit_s": sum(r["fit_seconds"] or 0 for r in results)})
    for r in rows:
        r["vs_one_after_another"] = r["wall_s"] / rows[0]["wall_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="images in the archive")
    ap.add_argument("--model", default="patchcore", help="detector that scores the archive")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--fits", type=int, default=4, help="rows of the fit-many manifest")
    ap.add_argument("--fit-model", default="patchcore")
    ap.add_argument("--fit-image-size", type=int, default=128)
    ap.add_argument("--fit-train", type=int, default=60, help="good training images per fit")
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument("--skip-fit-many", action="store_true")
    ap.add_argument("--work", metavar="DIR", help="keep data and results here (default: temp)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        scoring = [] if args.skip_scoring else bench_scoring(args, work)
        fitting = [] if args.skip_fit_many else bench_fit_many(args, work)
    if scoring:
        print_table(scoring, ["run", "images", "wall_s", "images_per_s", "vs_1_worker",
                              "vs_predict", "cpu_ms_per_image", "every_image_once"])
        r2 = next(r for r in scoring if r["run"].startswith("ray, 2 worker(s)"))
        print(f"targets: 2 vs 1 worker {r2['vs_1_worker']:.2f}x (>= {TARGET_SPEEDUP}); "
              f"2 workers vs predict {r2['vs_predict']:.2f}x (>= {TARGET_VS_PREDICT})")
    if fitting:
        print_table(fitting, ["run", "models", "ok", "wall_s", "sum_fit_s",
                              "vs_one_after_another"])
        print(f"target: fit-many on Ray {fitting[-1]['vs_one_after_another']:.2f}x the wall "
              f"time of one after another (<= {TARGET_FIT_RATIO}); "
              f"{fitting[-1]['wall_s'] / fitting[1]['wall_s']:.2f}x one after another on 1 "
              "thread")
    write_json(args.json, {"scoring": scoring, "fit_many": fitting, "cpus": os.cpu_count(),
                           "args": vars(args)})


if __name__ == "__main__":
    main()
