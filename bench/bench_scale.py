"""Every stage on a CASIA-shaped dataset: wall time, images per second and peak memory per stage.

1. renders (once, cached under ``--work``) a folder-per-identity training set of ``--images``
   synthetic faces of ``--identities`` identities, with a long-tailed count per identity
   (``count ~ rank^-0.5``, at least 5 images: the largest identity holds ~18x the mean, as in
   CASIA-WebFace, 804 vs 46.7), plus a held-out test set (a tenth as many identities, 10
   images each) with a pairs CSV (3 pairs per test image, 10 identity-disjoint folds, half
   same). Faces come from the built-in renderer (``pipeline.datasets.synthetic``), one seeded
   identity per folder, at ``--size`` pixels;
2. makes a fresh git + DVC project under ``--work`` (this checkout's ``pipeline/``, ``dvc.yaml``,
   ``.dvc/config``), whose params train one loss (ArcFace, one seed, one epoch, 112 px input);
3. runs every stage's command in order (data, detect, align, shard, recipes, train, embed,
   score, report), each as its own process: wall time, CPU time and peak resident memory
   (``ru_maxrss`` from ``wait4`` of that process and its children), then ``dvc commit`` of
   the stage (DVC's own cost: hashing the outputs and moving them into the cache), and the
   size and number of files of each output;
4. prints one line per stage and a JSON record (``--out`` keeps a copy).

    nice -n 10 .venv/bin/python bench/bench_scale.py --images 10000 --identities 400 \\
        --out reports/benchmarks/scale_10000.txt
    .venv/bin/python bench/bench_scale.py --compare reports/benchmarks/scale_10000.txt \\
        reports/benchmarks/scale_50000.txt          # growth per stage, as a Markdown table

Uses ``FACEPIPE_THREADS`` / all cores like the stages. Nothing in this checkout is modified
(besides ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEST_IMAGES_PER_IDENTITY = 10
PAIRS_PER_TEST_IMAGE = 3
FOLDS = 10
MIN_PER_IDENTITY = 5
TAIL_EXPONENT = 0.5
# Two losses: the report compares models and stops with a single one (KeyError 'test_set' in
# report.py when there is no pair of models to compare).
LOSSES = ("arcface", "softmax")
TEST_SET = "heldout"


# ----------------------------------------------------------------------------- the dataset
def identity_counts(images: int, identities: int, minimum: int = MIN_PER_IDENTITY,
                    exponent: float = TAIL_EXPONENT) -> list[int]:
    """Images per identity: ``minimum`` each plus the rest shared in proportion to ``rank^-exponent``
    (largest remainders), so the counts sum to ``images`` exactly."""
    import numpy as np

    if images < minimum * identities:
        raise SystemExit(f"bench_scale: {images} images cannot give {identities} identities {minimum} each")
    weights = np.arange(1, identities + 1, dtype=np.float64) ** -exponent
    share = weights / weights.sum() * (images - minimum * identities)
    counts = np.floor(share).astype(int)
    rest = images - minimum * identities - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:rest]] += 1
    return (counts + minimum).tolist()


def _render_identity(task: tuple) -> int:
    """Worker: every image of one identity into ``folder/<name>/<name>_NNNN.jpg``."""
    import cv2
    import numpy as np

    from pipeline.datasets import synthetic

    seed, group, index, count, size, folder = task
    identity = synthetic.sample_identity(synthetic.identity_rng(seed, group, index), "a")
    name = f"{group}_{index + 1:05d}"
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    for j in range(count):
        target = out / f"{name}_{j + 1:04d}.jpg"
        if target.is_file():
            continue
        variation = synthetic.sample_variation(synthetic.image_rng(seed, group, index, j), "a")
        face = synthetic.render_face(identity, variation, size)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(face[..., ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, variation.jpeg_quality])
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, target)
    return count


def _pool_init() -> None:
    import cv2

    cv2.setNumThreads(1)


def render(tasks: list[tuple], workers: int) -> None:
    import multiprocessing

    done, total, started = 0, sum(t[3] for t in tasks), time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_pool_init) as pool:
        for count in pool.imap_unordered(_render_identity, tasks, chunksize=4):
            done += count
            if done * 10 // total != (done - count) * 10 // total:
                print(f"  rendered {done}/{total} images ({time.perf_counter() - started:.0f} s)", flush=True)


def test_pairs(identities: list[str], per: int, n_pairs: int, seed: int) -> list[tuple[str, str, int, int]]:
    """``n_pairs`` distinct pairs (path1, path2, same, fold) over ``identities`` x ``per`` images:
    identities dealt to ``FOLDS`` folds, each fold half same and half different pairs. Sampled,
    never enumerated, so the cost is linear in ``n_pairs``."""
    import numpy as np

    rng = np.random.default_rng([seed, 99])
    order = rng.permutation(len(identities))
    folds = [[identities[k] for k in order[f::FOLDS]] for f in range(FOLDS)]
    rows, seen = [], set()

    def image(ident: str, j: int) -> str:
        return f"{ident}/{ident}_{j + 1:04d}.jpg"

    for f, members in enumerate(folds):
        want = n_pairs // FOLDS + (1 if f < n_pairs % FOLDS else 0)
        same_target = want // 2
        got_same = got_diff = 0
        while got_same + got_diff < want:
            same = got_same < same_target
            if same:
                ident = members[rng.integers(len(members))]
                a, b = rng.choice(per, 2, replace=False)
                pair = (image(ident, int(a)), image(ident, int(b)))
            else:
                i, k = rng.choice(len(members), 2, replace=False)
                pair = (image(members[i], int(rng.integers(per))), image(members[k], int(rng.integers(per))))
            key = tuple(sorted(pair))
            if key in seen:
                continue
            seen.add(key)
            rows.append((*pair, int(same), f + 1))
            got_same += same
            got_diff += not same
    return rows


def make_dataset(work: Path, images: int, identities: int, size: int, seed: int,
                 workers: int) -> tuple[Path, Path, Path]:
    """(train folder, test folder, pairs CSV) under ``work/dataset-<images>-<identities>-<size>``, rendered once."""
    root = work / f"dataset-{images}-{identities}-{size}px"
    train, test, pairs_csv = root / "train", root / "test", root / "pairs.csv"
    done = root / "complete.json"
    if done.is_file():
        return train, test, pairs_csv
    counts = identity_counts(images, identities)
    n_test = max(2 * FOLDS, identities // 10)
    tasks = [(seed, "casia", i, c, size, str(train)) for i, c in enumerate(counts)]
    tasks += [(seed, "heldout", i, TEST_IMAGES_PER_IDENTITY, size, str(test)) for i in range(n_test)]
    tasks.sort(key=lambda t: -t[3])  # big identities first: even load at the end
    print(f"rendering {images} training images of {identities} identities (largest {counts[0]}, smallest "
          f"{counts[-1]}) and {n_test * TEST_IMAGES_PER_IDENTITY} test images at {size} px on {workers} processes",
          flush=True)
    started = time.perf_counter()
    render(tasks, workers)
    names = [f"heldout_{i + 1:05d}" for i in range(n_test)]
    rows = test_pairs(names, TEST_IMAGES_PER_IDENTITY, PAIRS_PER_TEST_IMAGE * n_test * TEST_IMAGES_PER_IDENTITY, seed)
    with open(pairs_csv, "w") as f:
        f.write("path1,path2,same,fold\n")
        f.writelines(f"{a},{b},{s},{k}\n" for a, b, s, k in rows)
    done.write_text(json.dumps({"images": images, "identities": identities, "counts": counts, "size": size,
                                "render_s": round(time.perf_counter() - started, 1)}))
    print(f"rendered in {time.perf_counter() - started:.0f} s", flush=True)
    return train, test, pairs_csv


# ----------------------------------------------------------------------------- the project
def make_project(work: Path, label: str, train: Path, test: Path, pairs_csv: Path) -> Path:
    import yaml

    project = work / f"project-{label}"
    if project.exists():
        shutil.rmtree(project)
    project.mkdir(parents=True)
    shutil.copytree(REPO / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["train"] = {"kind": "folder", "path": str(train)}
    params["data"]["tests"] = {TEST_SET: {"kind": "pairs_csv", "path": str(pairs_csv), "root": str(test)}}
    params["seeds"]["train"] = [0]
    params["train_losses"] = list(LOSSES)
    params["train"]["epochs"] = 1
    params["train"]["warmup_epochs"] = 0
    params["align"]["size"] = 112
    params["report"]["in_domain"] = "heldout"
    params["report"]["cross_domain"] = []
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    return project


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")


def measured(cmd: list[str], cwd: Path, log) -> dict:
    """Run ``cmd``; wall and CPU seconds and peak RSS (MiB) of it and its children (wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: {' '.join(cmd)} failed with status {proc.returncode}; see {log.name}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path`` (a file or a folder; symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
            files += 1
    return total, files


def stage_list(images_of: dict[str, int]) -> list[tuple[str, list[str], int, str, list[str]]]:
    """(DVC stage, command, units processed, unit, outputs) in pipeline order: each data set's
    data, detect, align and shard stages, then per loss its training run and the test set's
    embed and score stages."""
    py = [sys.executable, "-m", "pipeline"]
    stages = []
    for kind, unit, outs in (("data", "images", "data/datasets"), ("detect", "images", "data/detect"),
                             ("align", "faces", "data/aligned"), ("shard", "faces", "data/shards")):
        units = "all" if unit == "images" else "faces"
        for name, stage in (("train", f"{kind}_train"), (TEST_SET, f"{kind}@{TEST_SET}")):
            share = images_of[f"{units}_{name}"]
            stages.append((stage, py + [kind, name, "--no-progress"], share, unit, [f"{outs}/{name}"]))
    stages.append(("recipes", py + ["recipes"], 1, "recipes", ["data/recipes"]))
    for loss in LOSSES:
        run = f"{loss}-0"
        stages += [
            (f"train@{run}", py + ["train", loss, "--seed", "0", "--no-progress"], images_of["train"],
             "training images (1 epoch)", [f"data/models/{run}"]),
            (f"embed_train@{run}", py + ["embed-train", loss, "--seed", "0"], images_of["train"],
             "training images (validation, angles)", [f"data/embeddings/{run}/validation", f"data/embeddings/{run}/train"]),
            (f"embed@{run}-{TEST_SET}", py + ["embed", loss, "--seed", "0", "--set", TEST_SET], images_of["test"],
             "test images", [f"data/embeddings/{run}/{TEST_SET}"]),
            (f"score@{run}-{TEST_SET}", py + ["score", loss, "--seed", "0", "--set", TEST_SET], images_of["pairs"],
             "pairs", [f"data/scores/{run}/{TEST_SET}"]),
        ]
    return stages + [("report", py + ["report"], images_of["pairs"] * len(LOSSES), "pairs x models",
                      ["reports/index.md"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="training images")
    parser.add_argument("--identities", type=int, default=400, help="training identities")
    parser.add_argument("--size", type=int, default=112, help="rendered image side (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facepipe-scale"), help="datasets and projects")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    parser.add_argument("--keep", action="store_true", help="keep the project folder afterwards")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("SMALL", "LARGE"),
                        help="print the growth per stage between two earlier outputs (Markdown) and exit")
    args = parser.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    from pipeline.cpu import available_cores, thread_count

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    workers = args.workers or available_cores()
    started = time.perf_counter()
    train, test, pairs_csv = make_dataset(work, args.images, args.identities, args.size, args.seed, workers)
    meta = json.loads((train.parent / "complete.json").read_text())
    n_test = sum(1 for _ in test.rglob("*.jpg"))
    n_pairs = sum(1 for _ in open(pairs_csv)) - 1
    label = f"{args.images}"
    project = make_project(work, label, train, test, pairs_csv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "pipeline", "dvc.yaml"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    say(f"date: {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}   commit: {commit.strip()}"
        f"{' + uncommitted changes' if dirty else ''}")
    say(f"machine: {platform.processor() or platform.machine()}, {available_cores()} cores usable, "
        f"FACEPIPE_THREADS/threads {thread_count()}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30}"
        f" GiB RAM, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, nice {os.nice(0)}")
    counts = meta["counts"]
    say(f"dataset: {args.images} training images of {args.identities} identities (per identity: max {max(counts)}, "
        f"median {sorted(counts)[len(counts) // 2]}, min {min(counts)}), {n_test} test images of "
        f"{n_test // TEST_IMAGES_PER_IDENTITY} held-out identities, {n_pairs} pairs; {args.size} px synthetic "
        f"faces (rendered in {meta['render_s']} s, not part of any stage)")
    cache_type = subprocess.run(["dvc", "config", "cache.type"], cwd=project, env=_env(), capture_output=True,
                                text=True).stdout.strip() or "reflink,copy (default)"
    say(f"project: {project} (align.size 112, {' and '.join(LOSSES)}, 1 epoch, 1 seed, smallcnn; "
        f"dvc cache.type {cache_type})")
    units = {"all_train": args.images, f"all_{TEST_SET}": n_test, "faces_train": args.images,
             f"faces_{TEST_SET}": n_test, "train": args.images, "test": n_test, "pairs": n_pairs}
    with open(project / "stages.log", "w") as log:
        startup = measured([sys.executable, "-m", "pipeline", "validate"], project, log)
    say(f"startup of one stage process (python -m pipeline validate: imports, params check): "
        f"{startup['wall_s']:.1f} s wall, {startup['peak_rss_mib']:.0f} MiB")
    say("")
    say(f"{'stage':<17} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'units/s':>9}  {'dvc commit s':>12} "
        f"{'output MiB':>10} {'files':>7}  units")
    results = []
    with open(project / "stages.log", "a") as log:
        for stage, cmd, n, unit, outs in stage_list(units):
            if stage.startswith(("align", "shard")):  # the faces that detection kept
                name = cmd[-2]
                n = json.loads((project / "reports" / "detection" / f"{name}.json").read_text())["faces"]
            log.write(f"\n===== {stage}: {' '.join(cmd)}\n")
            log.flush()
            usage = measured(cmd, project, log)
            load = os.getloadavg()[0]
            dvc = measured(["dvc", "commit", "--force", "--quiet", stage], project, log)
            size, files = map(sum, zip(*(tree_size(project / o) for o in outs)))
            rate = n / usage["wall_s"] if usage["wall_s"] else float("nan")
            row = {"stage": stage, **usage, "units": n, "unit": unit, "units_per_s": round(rate, 2),
                   "dvc_commit_s": dvc["wall_s"], "output_mib": round(size / 2**20, 2), "output_files": files,
                   "load_after": round(load, 2)}
            results.append(row)
            say(f"{stage:<17} {usage['wall_s']:>8.1f} {usage['cpu_s']:>8.1f} {usage['peak_rss_mib']:>9.0f} "
                f"{rate:>9.1f}  {dvc['wall_s']:>12.1f} {size / 2**20:>10.1f} {files:>7}  {n} {unit}")
    status = subprocess.run(["dvc", "status", "--quiet"], cwd=project, env=_env(), capture_output=True, text=True)
    total = sum(r["wall_s"] + r["dvc_commit_s"] for r in results)
    say("")
    say(f"all stages: {total:.0f} s ({total / 60:.1f} min) including dvc commit; `dvc status` afterwards: "
        f"{'up to date' if status.returncode == 0 else 'CHANGED: ' + status.stdout.strip()[:200]}")
    say(f"detection: {units['faces']} of {units['all']} images kept; "
        f"bench wall time {time.perf_counter() - started:.0f} s")
    record = {"images": args.images, "identities": args.identities, "test_images": n_test, "pairs": n_pairs,
              "size": args.size, "threads": thread_count(), "startup": startup, "stages": results}
    say("JSON " + json.dumps(record, sort_keys=True))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    if not args.keep:
        shutil.rmtree(project, ignore_errors=True)


def _record(path: Path) -> dict:
    for line in path.read_text().splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    raise SystemExit(f"bench_scale: {path} holds no JSON record")


def compare(small_path: Path, large_path: Path) -> str:
    """Markdown table: each stage at both sizes and its growth: the ratio of its wall and CPU
    times over the ratio of its units, and the exponent of CPU time in units (1 = linear)."""
    import math

    small, large = _record(small_path), _record(large_path)
    by_stage = {r["stage"]: r for r in small["stages"]}
    rows = ["| stage | units (small → large) | wall s | CPU s | units/s (wall) | peak MiB | dvc commit s | "
            "units × | wall × | CPU × | CPU exponent | exponent without startup |", "|" + "---|" * 12]
    base = small.get("startup", {}).get("cpu_s", 0.0)
    for r in large["stages"]:
        s = by_stage[r["stage"]]
        u_ratio = r["units"] / s["units"] if s["units"] else float("nan")
        w_ratio = r["wall_s"] / s["wall_s"] if s["wall_s"] else float("nan")
        c_ratio = r["cpu_s"] / s["cpu_s"] if s["cpu_s"] else float("nan")
        exponent = math.log(c_ratio) / math.log(u_ratio) if u_ratio > 1 and c_ratio > 0 else float("nan")
        net = (r["cpu_s"] - base) / (s["cpu_s"] - base) if s["cpu_s"] > base and r["cpu_s"] > base else float("nan")
        net_exponent = math.log(net) / math.log(u_ratio) if u_ratio > 1 and net > 0 else float("nan")
        rows.append(f"| {r['stage']} | {s['units']} → {r['units']} {r['unit']} | "
                    f"{s['wall_s']:.1f} → {r['wall_s']:.1f} | "
                    f"{s['cpu_s']:.1f} → {r['cpu_s']:.1f} | {s['units_per_s']:.0f} → {r['units_per_s']:.0f} | "
                    f"{s['peak_rss_mib']:.0f} → {r['peak_rss_mib']:.0f} | {s['dvc_commit_s']:.1f} → "
                    f"{r['dvc_commit_s']:.1f} | {u_ratio:.2f} | {w_ratio:.2f} | {c_ratio:.2f} | {exponent:.2f} | "
                    f"{net_exponent:.2f} |")
    startup = small.get("startup", {})
    rows.append("")
    rows.append(f"Startup of a stage process (imports, params check): "
                f"{startup.get('wall_s', float('nan')):.1f} s wall, "
                f"{startup.get('cpu_s', float('nan')):.1f} s CPU, {startup.get('peak_rss_mib', float('nan')):.0f} MiB; "
                f"it is part of every stage's time and does not grow.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
