"""Identification against a million distractors (MegaFace protocol) from features, at the real size.

The problem (deterministic from --seed): 10^6 x 512 float32 distractor features (random unit
vectors: other people) and 3,530 probe features of 80 identities (about 44 images each; identity
centre x a per-image quality in [0.5, 1.5] + unit noise), as FaceScrub's probe set is. Measured:
:func:`pipeline.protocols.identification.distractor_search` end to end: rank-1 and the CMC (ranks
1..10) at N = 10, 100, ..., 10^6, and TPR at FPR = 1e-6 against the distractors (3.5 billion
impostor pairs), by chunked matrix products with a running top-k and top-M. Its similarity phase
(products and top-k) is stated in GFLOP/s against a plain float32 matrix product of one chunk's shape
measured in the same run, just before and just after. Memory: the peak resident set above the
inputs (Linux VmHWM, reset after the inputs are made) and in all. A spot check recomputes the
rank-1 of 20 probes with a full [20, 10^6] similarity matrix.

    FACEPIPE_THREADS=2 .venv/bin/python bench/bench_distractors.py [--distractors 1000000] [--chunk 8192]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cpu  # noqa: E402

cpu.pin_instruction_set()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_ijb import GIB, machine, peak, reset_peak  # noqa: E402
from pipeline.protocols.identification import distractor_search  # noqa: E402

SIZES = (10, 100, 1_000, 10_000, 100_000, 1_000_000)


def make_problem(n_distractors: int, n_probes: int, n_identities: int, dim: int, seed: int):
    """Unit distractors [N, D] float32 made in chunks, probes [P, D], their identities [P]."""
    gen = torch.Generator().manual_seed(seed)
    distractors = torch.empty(n_distractors, dim)
    for s in range(0, n_distractors, 65536):
        block = distractors[s:s + 65536]
        block.normal_(generator=gen)
        block /= block.norm(dim=1, keepdim=True)
    centres = torch.randn(n_identities, dim, generator=gen)
    centres /= centres.norm(dim=1, keepdim=True)
    identity = torch.arange(n_probes) % n_identities
    quality = torch.rand(n_probes, 1, generator=gen) + 0.5
    probes = quality * centres[identity] + torch.randn(n_probes, dim, generator=gen) / math.sqrt(dim)
    return distractors.numpy(), probes.numpy(), np.array([f"id{i:03d}" for i in identity.tolist()])


def matmul_rate(probes: torch.Tensor, chunk: int, dim: int, seconds: float = 3.0) -> float:
    """GFLOP/s of ``probes @ block.T`` for a random [chunk, dim] block, repeated for ``seconds``."""
    block = torch.randn(chunk, dim)
    probes @ block.T  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        probes @ block.T
        reps += 1
    return 2.0 * probes.shape[0] * chunk * dim * reps / (time.perf_counter() - start) / 1e9


def spot_check(probes: np.ndarray, distractors: np.ndarray, result, count: int = 20) -> str:
    """Rank 1 or not, for ``count`` searches, recomputed from full similarity rows over every distractor."""
    picks = np.random.default_rng(3).choice(len(result.pair_probe), count, replace=False)
    unit = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    p, g = result.pair_probe[picks], result.pair_gallery[picks]
    rows = torch.from_numpy(unit[p]) @ torch.from_numpy(distractors).T  # [count, N]
    genuine = torch.from_numpy(np.einsum("ij,ij->i", unit[p], unit[g]))
    direct = ((rows > genuine[:, None]).sum(1) == 0).numpy()
    agree = int((direct == result.correct[picks]).sum())
    return f"check: rank 1 or not for {count} searches, from full [{count}, N] similarity rows: {agree}/{count} agree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--distractors", type=int, default=1_000_000)
    parser.add_argument("--probes", type=int, default=3_530)
    parser.add_argument("--identities", type=int, default=80)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(cpu.thread_count())
    print(machine(), flush=True)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"kernels: torch CPU capability {torch.backends.cpu.get_cpu_capability()} "
          f"({'native' if os.environ.get('FACEPIPE_NATIVE_CPU') else 'pinned to AVX2 as the pipeline runs'})")
    t0 = time.perf_counter()
    distractors, probes, identities = make_problem(args.distractors, args.probes, args.identities, args.dim, args.seed)
    print(f"problem: {args.probes:,} probes of {args.identities} identities, {args.distractors:,} x {args.dim} "
          f"distractors; made in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
    unit = torch.from_numpy(probes / np.linalg.norm(probes, axis=1, keepdims=True))
    before = matmul_rate(unit, args.chunk, args.dim)
    base = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    result = distractor_search(probes, identities, distractors, sizes=SIZES, max_rank=10, fprs=(1e-6,),
                               chunk=args.chunk)
    total, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    mem = peak()
    after = matmul_rate(unit, args.chunk, args.dim)
    timing = result.timing
    rate = timing["gflop"] / timing["similarity_s"]
    plain = (before + after) / 2
    print(f"end to end {total:.1f} s wall, {cpu_s:.1f} s CPU (similarity phase {timing['similarity_s']:.1f} s, "
          f"of which products {timing['matmul_s']:.1f} s); peak RSS {mem / GIB:.2f} GiB "
          f"({(mem - base) / GIB:+.2f} GiB above the inputs)")
    print(f"similarity phase: {timing['gflop']:.0f} GFLOP at {rate:.0f} GFLOP/s; plain [{args.probes}, {args.dim}] x "
          f"[{args.dim}, {args.chunk}] products: {before:.0f} GFLOP/s before, {after:.0f} after; "
          f"ratio {rate / plain:.0%} of the plain product (products alone: "
          f"{timing['gflop'] / timing['matmul_s'] / plain:.0%})")
    print(f"searches (probe, mate): {len(result.correct):,}; impostor pairs: {result.n_impostor:,}")
    for n in result.sizes:
        cmc = result.cmc[n]
        print(f"N = {n:>9,}: rank-1 {cmc[1]:.4f}, rank-5 {cmc[5]:.4f}, rank-10 {cmc[10]:.4f}")
    tpr = result.tpr[1e-6]
    print(f"TPR at FPR = 1e-6 against the distractors: {'n/a' if tpr is None else f'{tpr:.4f}'} "
          f"({result.n_genuine:,} genuine pairs)")
    print(spot_check(probes, distractors, result))


if __name__ == "__main__":
    main()
