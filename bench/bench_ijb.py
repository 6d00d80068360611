"""IJB-C 1:1 from features at the real size: the reference procedure against pipeline.protocols, side by side.

The problem (deterministic from --seed): 470,000 x 512 float32 face features (subject centre x a
per-template quality + template and media offsets + noise), detector scores, 23,124 templates
(3,531 gallery templates, one per subject, and 19,593 probe templates) whose faces fall into media:
stills (one face) and videos (several frames), 2% of media ids shared with another template (of any
subject); 15,658,489 template pairs (every probe against its subject's gallery template, 19,557
genuine, and about 798 other gallery templates), sorted by the first template.

Reference procedure (as the original evaluation script does it, written here from its description):
features times detector scores; a Python loop over templates, each finding its faces by a search of
the whole face list, and over its media; float64 template features; pair scores gathered in batches
of 100,000 (float64); ``sklearn.metrics.roc_curve`` and TPR at the ROC point nearest each FPR.

Ours: :func:`pipeline.protocols.ijb.pool_templates` (one sparse product),
:func:`~pipeline.protocols.ijb.pair_scores` (blocks of the gallery x probe Gram matrix) and
:func:`pipeline.protocols.verification.verification_metrics` (sorted impostor scores), then the
subject bootstrap (:class:`pipeline.protocols.subjects.PairResampler`, 1,000 resamples).

Memory: the peak resident set of each phase group (Linux VmHWM, reset before each), total and above
what the inputs already hold. Prints the load average and the CPU with the figures.

    FACEPIPE_THREADS=2 .venv/bin/python bench/bench_ijb.py [--scale 0.05] [--no-reference] [--boot 1000]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cpu  # noqa: E402

cpu.pin_instruction_set()

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from pipeline.metrics import tpr_at_fpr  # noqa: E402
from pipeline.protocols.ijb import pair_scores, pool_templates, template_index  # noqa: E402
from pipeline.protocols.subjects import PairResampler, draw_weights  # noqa: E402
from pipeline.protocols.verification import verification_metrics  # noqa: E402

FPRS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
REAL = {"faces": 470_000, "dim": 512, "subjects": 3_531, "probes": 19_593, "pairs": 15_658_489, "genuine": 19_557}


# ------------------------------------------------------------------------------ memory, machine
def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"cpu: {model}, {os.cpu_count()} cores visible, {cpu.thread_count()} threads (FACEPIPE_THREADS or the "
            f"cores); load average (1, 5, 15 min): {load}")


GIB = 2**30


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------- the problem
def make_problem(scale: float, seed: int) -> dict:
    """Faces, media, templates, pairs of an IJB-C-shaped set (``scale`` shrinks every count)."""
    rng = np.random.default_rng(seed)
    n_faces = max(1000, int(REAL["faces"] * scale))
    n_subj = max(20, int(REAL["subjects"] * scale))
    n_probe = max(40, int(REAL["probes"] * scale))
    n_pairs = max(2000, int(REAL["pairs"] * scale * scale))
    n_gen = min(n_probe - 1, int(REAL["genuine"] * scale))
    n_tmpl = n_subj + n_probe
    dim = REAL["dim"]
    # faces per template, summing to n_faces
    raw = rng.gamma(1.2, 1.0, n_tmpl) + 0.05
    per = np.maximum(1, np.floor(raw / raw.sum() * n_faces)).astype(np.int64)
    extra = n_faces - per.sum()
    per[rng.choice(n_tmpl, abs(int(extra)), replace=True)] += np.sign(extra)
    per = np.maximum(per, 1)
    per[-1] += n_faces - per.sum()
    face_tmpl = np.repeat(np.arange(n_tmpl), per)
    # media: stills (70%) and videos (mean 10 frames), cut at template boundaries
    sizes = np.where(rng.random(n_faces) < 0.7, 1, 1 + rng.geometric(1 / 9, n_faces))
    breaks = np.union1d(np.cumsum(sizes)[np.cumsum(sizes) < n_faces], np.cumsum(per)[:-1])
    segment = np.zeros(n_faces, dtype=np.int64)
    segment[breaks] = 1
    media = np.cumsum(segment)
    n_media = int(media[-1]) + 1
    shared = rng.random(n_media) < 0.02
    relabel = np.arange(n_media)
    relabel[shared] = rng.integers(0, n_media, int(shared.sum()))
    media = relabel[media] + 70_000
    template_ids = np.sort(rng.choice(200_000, n_tmpl, replace=False) + 1)
    gallery, probes = np.arange(n_subj), np.arange(n_subj, n_tmpl)
    subject = np.concatenate([gallery, rng.integers(0, n_subj, n_probe)])
    features = _features(rng, subject, face_tmpl, media, n_tmpl, dim)
    detector = rng.uniform(0.3, 1.0, n_faces).astype(np.float32)
    t1, t2, label = _pairs(rng, subject, probes, n_subj, n_pairs, n_gen)
    return {"features": features, "detector": detector, "face_template": template_ids[face_tmpl],
            "face_media": media, "t1": template_ids[t1].astype(np.int32), "t2": template_ids[t2].astype(np.int32),
            "label": label,
            "subject": subject, "template_ids": template_ids, "n_media": n_media}


def _features(rng, subject, face_tmpl, media, n_tmpl, dim) -> np.ndarray:
    n_subj = int(subject.max()) + 1
    centres = rng.standard_normal((n_subj, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offsets = rng.standard_normal((n_tmpl, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
    quality = rng.uniform(0.15, 1.2, n_tmpl).astype(np.float32)
    out = np.empty((len(face_tmpl), dim), dtype=np.float32)
    for s in range(0, len(face_tmpl), 65536):
        t = face_tmpl[s:s + 65536]
        block = rng.standard_normal((len(t), dim), dtype=np.float32)
        block *= np.float32(1.2 / math.sqrt(dim))
        block += quality[t, None] * centres[subject[t]]
        block += np.float32(0.8) * offsets[t]
        block *= rng.uniform(5.0, 30.0, (len(t), 1)).astype(np.float32)  # the raw feature norm
        out[s:s + 65536] = block
    return out


def _pairs(rng, subject, probes, n_subj, n_pairs, n_gen):
    """Each probe against its subject's gallery template (n_gen of them) and random other ones."""
    n_probe = len(probes)
    n_imp = n_pairs - n_gen
    per = np.full(n_probe, n_imp // n_probe)
    per[: n_imp - per.sum()] += 1
    t1 = np.empty(n_pairs, dtype=np.int32)  # filled in place: no heap of small arrays left behind
    t2 = np.empty(n_pairs, dtype=np.int32)
    at = 0
    for p, k in zip(probes, per):
        others = rng.choice(n_subj - 1, int(k), replace=False)
        others += others >= subject[p]
        t1[at:at + k], t2[at:at + k] = others, p
        at += k
    t1[at:], t2[at:] = subject[probes[:n_gen]], probes[:n_gen]
    order = np.argsort(t1.astype(np.int64) * len(subject) + t2)
    t1, t2 = t1[order], t2[order]
    del order
    return t1, t2, subject[t1] == subject[t2]


# ---------------------------------------------------------------------------------- reference
def reference(problem: dict, timing: dict) -> tuple[np.ndarray, dict]:
    """The original evaluation script's procedure (see the module docstring)."""
    from sklearn.metrics import roc_curve

    t0 = time.perf_counter()
    feats = problem["features"] * problem["detector"][:, None]
    templates, medias = problem["face_template"], problem["face_media"]
    unique_templates = np.unique(templates)
    pooled = np.zeros((len(unique_templates), feats.shape[1]))
    for k, t in enumerate(unique_templates):
        (where,) = np.where(templates == t)
        face_feats, face_medias = feats[where], medias[where]
        media_feats = []
        for m, count in zip(*np.unique(face_medias, return_counts=True)):
            (in_media,) = np.where(face_medias == m)
            media_feats.append(face_feats[in_media] if count == 1 else face_feats[in_media].mean(0, keepdims=True))
        pooled[k] = np.sum(np.array(media_feats), 0)
    pooled /= np.sqrt((pooled**2).sum(-1, keepdims=True))
    del feats
    timing["pool"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lookup = np.zeros(int(unique_templates.max()) + 1, dtype=int)
    lookup[unique_templates] = np.arange(len(unique_templates))
    p1, p2 = problem["t1"], problem["t2"]
    scores = np.zeros(len(p1))
    for s in range(0, len(p1), 100_000):
        f1 = pooled[lookup[p1[s:s + 100_000]]]
        f2 = pooled[lookup[p2[s:s + 100_000]]]
        scores[s:s + 100_000] = np.sum(f1 * f2, -1)
    timing["scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fpr, tpr, _ = roc_curve(problem["label"], scores)
    tprs = {f: float(tpr[np.argmin(np.abs(fpr - f))]) for f in FPRS}
    timing["roc"] = time.perf_counter() - t0
    return scores, tprs


# ---------------------------------------------------------------------------------------- ours
def ours(problem: dict, timing: dict) -> tuple[np.ndarray, object]:
    t0 = time.perf_counter()
    n = len(problem["features"])
    ids, pooled = pool_templates(problem["features"], np.arange(n), problem["face_template"],
                                 problem["face_media"], detector=problem["detector"], keep_norm=True)
    timing["pool"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    i1, i2 = template_index(ids, problem["t1"]), template_index(ids, problem["t2"])
    scores = pair_scores(pooled, i1, i2)
    timing["scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = verification_metrics(scores, problem["label"], FPRS)
    timing["roc"] = time.perf_counter() - t0
    return scores, result


def _line(name: str, timing: dict, cpu_s: float, mem: int, base: int) -> str:
    total = sum(timing.values())
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in timing.items())
    return (f"{name:<10} {total:7.2f} s wall ({parts}); {cpu_s:.2f} s of CPU time (all threads); peak RSS "
            f"{mem / GIB:.2f} GiB ({(mem - base) / GIB:+.2f} GiB above the inputs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the problem (faces, templates x scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boot", type=int, default=1000, help="subject resamples (0: skip)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--io", action="store_true", help="also write the meta files and time read_ijb on them")
    args = parser.parse_args()
    threadpool_limits(cpu.thread_count(), user_api="blas")
    print(machine(), flush=True)
    blas = threadpool_info()[0]
    print(f"kernels: numpy BLAS {blas['internal_api']} {blas['architecture']} kernels, {blas['num_threads']} threads "
          f"({'native' if os.environ.get('FACEPIPE_NATIVE_CPU') else 'pinned to AVX2 as the pipeline runs'}); "
          "torch is not loaded (evaluating from features does not need it)")
    t0 = time.perf_counter()
    problem = make_problem(args.scale, args.seed)
    inputs = sum(v.nbytes for k, v in problem.items() if isinstance(v, np.ndarray))
    print(f"problem: {len(problem['features']):,} x {problem['features'].shape[1]} features, "
          f"{len(problem['template_ids']):,} templates, {problem['n_media']:,} media, {len(problem['t1']):,} pairs "
          f"({int(problem['label'].sum()):,} genuine); made in {time.perf_counter() - t0:.1f} s "
          f"(not counted); the inputs' arrays hold {inputs / GIB:.2f} GiB, the process {reset_peak() / GIB:.2f} GiB",
          flush=True)
    fast_timing: dict = {}
    base = reset_peak()
    c0 = time.process_time()
    scores, result = ours(problem, fast_timing)
    fast_cpu, fast_mem = time.process_time() - c0, peak()
    print(_line("ours", fast_timing, fast_cpu, fast_mem, base), flush=True)
    print("ours TPR@FPR: " + ", ".join(f"{f:.0e}: {_fmt(result.tpr[f])}" for f in FPRS) + f"; AUC {result.auc:.5f}")
    checks(problem, scores, result)
    if not args.no_reference:
        ref_timing: dict = {}
        base = reset_peak()
        c0 = time.process_time()
        ref_scores, ref_tprs = reference(problem, ref_timing)
        ref_cpu, ref_mem = time.process_time() - c0, peak()
        print(_line("reference", ref_timing, ref_cpu, ref_mem, base), flush=True)
        print("reference TPR@FPR (nearest ROC point): " + ", ".join(f"{f:.0e}: {_fmt(v)}" for f, v in ref_tprs.items()))
        diff = float(np.abs(ref_scores - scores).max())
        print(f"ratio reference / ours: {sum(ref_timing.values()) / sum(fast_timing.values()):.1f}x in wall time, "
              f"{ref_cpu / fast_cpu:.1f}x in CPU time, {ref_mem / fast_mem:.2f}x in peak memory; "
              f"max |score difference| {diff:.2e}")
        exact = tpr_at_fpr(ref_scores, problem["label"], FPRS, interpolate=False)
        print("TPR@FPR of the reference's float64 scores by pipeline.metrics.tpr_at_fpr(interpolate=False): "
              + ", ".join(f"{f:.0e}: {_fmt(exact[f])}" for f in FPRS))
        del ref_scores
    if args.boot:
        bootstrap(problem, scores, args)
    if args.io:
        reading(problem)


def checks(problem: dict, scores: np.ndarray, result) -> None:
    """Spot checks of ours: 2,000 random pairs rescored in float64 from templates pooled by a plain loop."""
    rng = np.random.default_rng(1)
    pick = rng.choice(len(scores), 2000, replace=False)
    feats, tmpl, media = problem["features"], problem["face_template"], problem["face_media"]
    order = np.argsort(tmpl, kind="stable")
    starts = np.searchsorted(tmpl[order], problem["template_ids"])
    ends = np.searchsorted(tmpl[order], problem["template_ids"], side="right")
    cache: dict[int, np.ndarray] = {}

    def template(t: int) -> np.ndarray:
        if t not in cache:
            k = int(np.searchsorted(problem["template_ids"], t))
            rows = order[starts[k]:ends[k]]
            total = np.zeros(feats.shape[1])
            for m in np.unique(media[rows]):
                sel = rows[media[rows] == m]
                total += (feats[sel].astype(np.float64) * problem["detector"][sel, None]).mean(0)
            cache[t] = total / np.linalg.norm(total)
        return cache[t]

    direct = np.array([template(int(problem["t1"][i])) @ template(int(problem["t2"][i])) for i in pick])
    print(f"check: 2,000 random pairs rescored by a direct float64 loop: max |difference| "
          f"{np.abs(direct - scores[pick]).max():.2e}")


def reading(problem: dict) -> None:
    """Write the problem's face list, 5-point list and pair list in the released layout; time read_ijb."""
    import shutil
    import tempfile

    import pandas as pd

    from pipeline.protocols.ijb import read_ijb

    root = Path(tempfile.mkdtemp(prefix="ijb_io_"))
    try:
        (root / "meta").mkdir()
        n = len(problem["face_template"])
        names = pd.Series([f"{i + 1}.jpg" for i in range(n)])
        t0 = time.perf_counter()
        pd.DataFrame({"n": names, "t": problem["face_template"], "m": problem["face_media"]}).to_csv(
            root / "meta" / "ijbc_face_tid_mid.txt", sep=" ", header=False, index=False)
        points = np.random.default_rng(0).uniform(20, 90, (n, 10)).round(3)
        frame = pd.DataFrame(points).assign(s=problem["detector"].round(4))
        frame.insert(0, "n", names)
        frame.to_csv(root / "meta" / "ijbc_name_5pts_score.txt", sep=" ", header=False, index=False)
        pd.DataFrame({"a": problem["t1"], "b": problem["t2"], "l": problem["label"].astype(np.int8)}).to_csv(
            root / "meta" / "ijbc_template_pair_label.txt", sep=" ", header=False, index=False)
        size = sum(p.stat().st_size for p in (root / "meta").iterdir())
        print(f"io: wrote the three meta files ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s "
              "(not counted)", flush=True)
        base = reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        ijb = read_ijb(root, check_images=False)
        print(f"io: read_ijb (face list, landmarks, {len(ijb.pair_t1):,} pairs, cross-checks) "
              f"{time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU; peak RSS "
              f"{peak() / GIB:.2f} GiB ({(peak() - base) / GIB:+.2f} GiB above the inputs)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bootstrap(problem: dict, scores: np.ndarray, args) -> None:
    subject_of = dict(zip(problem["template_ids"].tolist(), problem["subject"].tolist()))
    lookup = np.zeros(int(problem["template_ids"].max()) + 1, dtype=np.int32)
    lookup[problem["template_ids"]] = [subject_of[t] for t in problem["template_ids"].tolist()]
    n_subj = int(problem["subject"].max()) + 1
    base = reset_peak()
    c0 = time.process_time()
    t0 = time.perf_counter()
    resampler = PairResampler(scores, problem["label"], lookup[problem["t1"]], lookup[problem["t2"]], n_subj, FPRS)
    setup = time.perf_counter() - t0
    weights = draw_weights(n_subj, args.boot, args.seed)
    t1 = time.perf_counter()
    tprs = resampler.tpr(weights)
    elapsed = time.perf_counter() - t1
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(tprs, axis=0, ddof=1)
    print(f"subject bootstrap: {args.boot} resamples of {n_subj:,} subjects in {setup + elapsed:.1f} s wall, "
          f"{time.process_time() - c0:.1f} s CPU (set-up {setup:.1f} s, {1000 * elapsed / max(args.boot, 1):.0f} ms "
          "a resample); peak RSS "
          f"{peak() / GIB:.2f} GiB ({(peak() - base) / GIB:+.2f} GiB above the inputs)")
    print("subject-bootstrap SD of TPR@FPR: " + ", ".join(f"{f:.0e}: {v:.4f}" for f, v in zip(FPRS, sd)))
    verify_resample(problem, scores, lookup, weights[0], tprs[0])


def verify_resample(problem, scores, lookup, w, tpr_row) -> None:
    """One resample recomputed directly: pairs repeated by their weight, pipeline.metrics.tpr_at_fpr."""
    s1, s2 = lookup[problem["t1"]], lookup[problem["t2"]]
    reps = np.where(problem["label"], w[s1], w[s1].astype(np.int64) * w[s2])
    direct = tpr_at_fpr(np.repeat(scores, reps), np.repeat(problem["label"], reps), FPRS, interpolate=False)
    worst = max(abs(direct[f] - v) for f, v in zip(FPRS, tpr_row) if direct[f] is not None)
    print(f"check: resample 0 recomputed on the explicitly repeated pairs: max |TPR difference| {worst:.1e}")


if __name__ == "__main__":
    main()
