"""Throughput of the score stage's numerics on synthetic pairs (prints pairs/s).

Usage: python bench/bench_scoring.py [--pairs 1000000] [--dim 128] [--n-boot 200]

Embeddings are generated per pair in chunks (only one chunk of [chunk, D] float32
embeddings lives in memory), scored with every distance variant, then the metrics run
on the cosine scores: AUC, EER, 10-fold LFW accuracy, TPR@FPR, the full
``verification_report`` without and with bootstrap, and a scikit-learn baseline
(``roc_auc_score`` + ``roc_curve``) measured in the same process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import metrics as M  # noqa: E402
from pipeline.distances import PairDistance, standard_variants  # noqa: E402


def _best_time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds over ``repeat`` runs; CPU time ignores time spent
    preempted by other processes, which matters on a shared 2-core machine."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def _line(name: str, n: int, t: tuple[float, float]) -> None:
    wall, cpu = t
    print(f"{name:<40s} {wall:8.3f} s {n / wall:12,.0f} pairs/s | "
          f"cpu {cpu:8.3f} s {n / cpu:12,.0f} pairs/s")


def _embedding_chunks(n: int, dim: int, chunk: int, seed: int):
    """Yield (a, b, labels) chunks: positives share a direction (cos ~ 0.5), negatives don't."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        y = rng.integers(0, 2, m).astype(bool)
        a = rng.standard_normal((m, dim), dtype=np.float32)
        b = rng.standard_normal((m, dim), dtype=np.float32)
        rho = rng.uniform(0.2, 0.8, m).astype(np.float32)[:, None]
        b[y] = rho[y] * a[y] + np.sqrt(1 - rho[y] ** 2) * b[y]
        scale = rng.uniform(0.5, 2.0, (m, 1)).astype(np.float32)  # un-normalised norms
        yield a * scale, b, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, rep = args.pairs, args.repeat
    print(f"{n:,} pairs, {args.dim}-D float32 embeddings, numpy {np.__version__}")

    variants = standard_variants() + [PairDistance("l2", True, squared=True)]
    spent = {v.name: [0.0, 0.0] for v in variants}
    scores = {v.name: np.empty(n) for v in variants}
    labels = np.empty(n, dtype=bool)
    pos = 0
    for a, b, y in _embedding_chunks(n, args.dim, args.chunk, args.seed):
        m = y.shape[0]
        labels[pos:pos + m] = y
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            scores[v.name][pos:pos + m] = v.scores(a, b)
            spent[v.name][0] += time.perf_counter() - t0
            spent[v.name][1] += time.process_time() - c0
        pos += m
    print("\n-- distances (one pass, 128-D float32 in, float64 out)")
    for v in variants:
        _line(f"PairDistance {v.name}", n, tuple(spent[v.name]))
    same = np.array_equal(scores["cosine_norm"], scores["cosine_raw"])
    print(f"cosine_norm == cosine_raw bit for bit: {same}")

    s = scores["cosine_raw"]
    folds = np.arange(n) % 10
    print("\n-- metrics on the cosine scores")
    timings = {
        "roc_auc": _best_time(lambda: M.roc_auc(s, labels), rep),
        "roc_curve": _best_time(lambda: M.roc_curve(s, labels), rep),
        "eer": _best_time(lambda: M.eer(s, labels), rep),
        "lfw_accuracy (10 folds)": _best_time(lambda: M.lfw_accuracy(s, labels, folds), rep),
        "tpr_at_fpr (4 targets)": _best_time(lambda: M.tpr_at_fpr(s, labels), rep),
        "protocol_predictions": _best_time(lambda: M.protocol_predictions(s, labels, folds), rep),
        "verification_report n_boot=0": _best_time(
            lambda: M.verification_report(s, labels, folds, n_boot=0), rep),
    }
    for name, sec in timings.items():
        _line(name, n, sec)
    if args.n_boot:
        t_boot = _best_time(
            lambda: M.verification_report(s, labels, folds, n_boot=args.n_boot), 1)
        _line(f"verification_report n_boot={args.n_boot}", n, t_boot)
        t_auc = _best_time(lambda: M.bootstrap_ci(M.roc_auc, s, labels, n_boot=args.n_boot), 1)
        _line(f"  AUC bootstrap alone ({args.n_boot})", n, t_auc)
        t_pair = _best_time(lambda: M.paired_bootstrap_auc(
            s, scores["l2_raw"], labels, n_boot=args.n_boot), 1)
        _line(f"paired_bootstrap_auc n_boot={args.n_boot}", n, t_pair)
    _line("delong_test (cosine vs l2_raw)", n,
          _best_time(lambda: M.delong_test(s, scores["l2_raw"], labels), 1))

    print("\n-- baseline (scikit-learn, same process, timed alternately with ours)")
    from sklearn.metrics import roc_auc_score, roc_curve

    sk_runs, our_runs, report_runs = [], [], []
    for _ in range(rep):  # interleaved, so a change in machine load hits both sides
        sk_runs.append(_best_time(lambda: (roc_auc_score(labels, s), roc_curve(labels, s)), 1))
        our_runs.append(_best_time(lambda: (M.roc_auc(s, labels), M.roc_curve(s, labels)), 1))
        report_runs.append(_best_time(
            lambda: M.verification_report(s, labels, folds, n_boot=0), 1))
    t_sk = tuple(min(r[i] for r in sk_runs) for i in (0, 1))
    ours = tuple(min(r[i] for r in our_runs) for i in (0, 1))
    full = tuple(min(r[i] for r in report_runs) for i in (0, 1))
    _line("sklearn roc_auc_score + roc_curve", n, t_sk)
    _line("ours roc_auc + roc_curve", n, ours)
    _line("ours verification_report n_boot=0", n, full)
    print(f"speed-up vs sklearn (same two numbers): wall {t_sk[0] / ours[0]:.2f}x, "
          f"cpu {t_sk[1] / ours[1]:.2f}x")
    print("full metric set (report, no bootstrap) / sklearn AUC+ROC: "
          f"wall {full[0] / t_sk[0]:.2f}x, cpu {full[1] / t_sk[1]:.2f}x the time")
    for label, sec in (("wall", full[0]), ("cpu", full[1])):
        verdict = "met" if n / sec >= 1e6 else "NOT met"
        print(f"target >= 1,000,000 pairs/s for the full metric set ({label}): {verdict}")
    rep_ = M.verification_report(s, labels, folds, n_boot=0)
    print(f"\n(sanity: AUC {rep_['auc']:.4f}, sklearn {roc_auc_score(labels, s):.4f}, "
          f"EER {rep_['eer']:.4f}, acc {rep_['accuracy_mean']:.4f})")


if __name__ == "__main__":
    main()
