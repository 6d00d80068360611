"""What the DVC stages of the protocols call; each writes its output folder atomically.

Per model run (a trained ``model.pt``) and set folder::

    run_ijb_embed(model_path, set_dir, out_dir, params)          # features of every IJB image
    run_ijb_eval(features_dir, set_dir, out_dir, params)         # 1:1 and 1:N metrics of that run
    run_distractor_embed(model_path, set_dir, out_dir, params)   # features of probes and distractors
    run_distractor_eval(features_dir, set_dir, out_dir, params)  # CMC, rank-1, TPR@FPR of that run

and once over every run of every model (``runs``: model name -> its runs' eval folders)::

    summarise(runs, out_dir, params)                             # intervals and Holm verdicts

``params`` is a :class:`pipeline.protocols.params.ProtocolParams` (``ProtocolParams.from_dict`` of a
params.yaml section). A stage that embeds should depend on the model file, the set folder and the
embedding params (``flip``, ``batch_size``); one that evaluates on the features folder, the set
folder's ``meta/`` (or lists) and the rest of the params; the summary on the eval folders.

Outputs. Embed: ``features.npy`` [M, D] float32 (raw model outputs, flip-fused), ``images.txt``
(one name a line, the row order; the distractor set writes ``probes.npy``/``probes.txt`` and
``distractors.npy``/``distractors.txt``), ``info.json``. Eval: ``metrics.json`` (point values, pair
and probe counts, which FPR levels the impostor pairs support), ``roc.csv`` or ``cmc.csv``, and
``bootstrap.npz``: for each metric, its value on each of ``n_boot`` subject resamples (drawn from
``seed`` and the subject list, so every run and model of a set shares them: paired), with the
subject list's digest. Summary: ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph

from pipeline import cpu
from pipeline.io import atomic_dir
from pipeline.metrics import fpr_key
from pipeline.protocols import ProtocolError
from pipeline.protocols.identification import distractor_search, identification_metrics, search_gallery
from pipeline.protocols.ijb import IJBSet, embed_ijb, load_crop, pair_scores, pool_templates, read_ijb, \
    template_index, _flip_embed
from pipeline.protocols.megaface import DISTRACTOR_DIR, PROBE_DIR, DistractorSet, read_distractor_set
from pipeline.protocols.params import ProtocolParams
from pipeline.protocols.subjects import PairResampler, bootstrap_rate, draw_weights, paired_verdicts, \
    subject_interval
from pipeline.protocols.verification import verification_metrics


def tpr_name(fpr: float) -> str:
    return f"tpr_{fpr_key(fpr)}"


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN and infinities as None / strings, float keys as text: JSON that any reader takes."""
    if isinstance(value, dict):
        return {(fpr_key(k) if isinstance(k, float) else str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return value


def _load_model(model_path: str | Path, device: str):
    import torch

    from pipeline.embed import load_model_file
    from pipeline.train import pick_device

    dev = pick_device(device, key="protocols.device")
    if dev.type == "cpu":
        torch.set_num_threads(cpu.thread_count())
    model, saved = load_model_file(model_path, dev)
    return model, saved, dev


def _blas_threads() -> None:
    """numpy's BLAS (the Gram blocks, the 1:N search) on the process's threads (``cpu.thread_count``)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(cpu.thread_count(), user_api="blas")


def _write_lines(path: Path, lines) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _read_lines(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ProtocolError(f"{path}: file not found; run the embed stage first")
    return np.array(path.read_text(encoding="utf-8").splitlines(), dtype=str)


def _features(folder: Path, stem: str, expected: np.ndarray, names_file: str | None = None) -> np.ndarray:
    """``stem.npy`` as a memory map, checked to hold one row per ``expected`` name (listed in
    ``names_file``, default ``stem.txt``) in that order."""
    names_file = names_file or f"{stem}.txt"
    names = _read_lines(folder / names_file)
    path = folder / f"{stem}.npy"
    if not path.is_file():
        raise ProtocolError(f"{path}: file not found; run the embed stage first")
    features = np.load(path, mmap_mode="r")
    if features.ndim != 2 or features.shape[0] != len(names):
        raise ProtocolError(f"{path}: shape {features.shape} does not match the {len(names)} names of {names_file}")
    if len(names) != len(expected) or not np.array_equal(names, expected):
        diff = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
        raise ProtocolError(f"{folder / names_file}:{diff + 1}: the features were made for another image "
                            "list than the set's; rerun the embed stage")
    return features


# ---------------------------------------------------------------------------------------- IJB
def run_ijb_embed(model_path: str | Path, set_dir: str | Path, out_dir: str | Path, params: ProtocolParams, *,
                  device: str = "cpu", progress: bool = True) -> dict:
    """Align and embed every image of an IJB set folder with one model; writes ``out_dir``."""
    ijb = read_ijb(set_dir, check_images=True)
    model, saved, dev = _load_model(model_path, device)
    features = embed_ijb(ijb, model, saved, params, device=dev, progress=progress)
    info = {"set": ijb.prefix, "model": str(model_path), "flip": params.flip, "images": int(len(ijb.images)),
            "dim": int(features.shape[1]), "image_size": int(saved["image_size"])}
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "features.npy", features)
        _write_lines(tmp / "images.txt", ijb.images)
        _json(tmp / "info.json", info)
    return info


def template_subjects(ijb: IJBSet, template_ids: np.ndarray) -> tuple[np.ndarray, int, str]:
    """Subject code (0..S-1) of each template, S, and where the subjects came from.

    From the 1:N files when they name every template; otherwise the connected components of the
    genuine pairs (templates joined by a genuine pair are one subject; others their own)."""
    lists = [*ijb.galleries.values(), *([ijb.probes] if ijb.probes else [])]
    if lists:
        ids = np.concatenate([t.templates for t in lists])
        subjects = np.concatenate([t.subjects for t in lists])
        ids, first = np.unique(ids, return_index=True)
        if np.isin(template_ids, ids).all():
            subject = subjects[first][np.searchsorted(ids, template_ids)]
            codes = np.unique(subject, return_inverse=True)[1].reshape(-1)
            return codes, int(codes.max()) + 1, "1:N files"
    i1 = template_index(template_ids, ijb.pair_t1[ijb.pair_label])
    i2 = template_index(template_ids, ijb.pair_t2[ijb.pair_label])
    graph = scipy.sparse.coo_matrix((np.ones(len(i1)), (i1, i2)), shape=(len(template_ids),) * 2)
    n, codes = scipy.sparse.csgraph.connected_components(graph, directed=False)
    return codes, int(n), "genuine pairs"


def _check_genuine_subjects(ijb: IJBSet, subject1: np.ndarray, subject2: np.ndarray, source: str) -> None:
    """A genuine pair must join templates of one subject (the 1:N files and the pair list agree)."""
    from pipeline.protocols.ijb import PAIRS, _line_of_row

    clash = ijb.pair_label & (subject1 != subject2)
    if clash.any():
        row = int(np.argmax(clash))
        path = ijb.meta(PAIRS)
        raise ProtocolError(f"{path}:{_line_of_row(path, row)}: templates {ijb.pair_t1[row]} and {ijb.pair_t2[row]} "
                            f"are a genuine pair but belong to different subjects in the {source}")


def _digest(codes: np.ndarray, params: ProtocolParams) -> str:
    h = hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update(f"{params.n_boot}/{params.seed}".encode())
    return h.hexdigest()[:16]


def _identification(ijb: IJBSet, template_ids: np.ndarray, pooled: np.ndarray, codes: np.ndarray,
                    weights: np.ndarray, params: ProtocolParams) -> tuple[dict, dict]:
    """Per gallery (and their mean): CMC, TPIR; the rank-1 of each subject resample."""
    if ijb.probes is None:
        return {}, {}
    probe = template_index(template_ids, ijb.probes.templates)
    out, boot = {}, {}
    for name, gallery in ijb.galleries.items():
        g = template_index(template_ids, gallery.templates)
        search = search_gallery(pooled[probe], codes[probe], pooled[g], codes[g])
        out[name] = identification_metrics(search, params.ranks, params.fpirs)
        boot[f"rank1_{name}"] = bootstrap_rate(search.rank[search.mated] == 1, search.subjects[search.mated], weights)
    if len(ijb.galleries) > 1:
        out["mean"] = {"cmc": {r: _mean([out[n]["cmc"][r] for n in ijb.galleries]) for r in params.ranks},
                       "tpir": {f: _mean([out[n]["tpir"][f] for n in ijb.galleries]) for f in params.fpirs}}
        boot["rank1_mean"] = np.mean([boot[f"rank1_{n}"] for n in ijb.galleries], axis=0)
    return out, boot


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def run_ijb_eval(features_dir: str | Path, set_dir: str | Path, out_dir: str | Path, params: ProtocolParams, *,
                 progress: bool = True, keep_scores: bool = False) -> dict:
    """Pool, score, and measure one run on an IJB set: 1:1 (ROC, TPR@FPR, AUC) and 1:N (CMC, TPIR),
    with the subject resamples of TPR@FPR and rank-1. ``keep_scores``: also write ``scores.npy``."""
    ijb = read_ijb(set_dir, check_images=False)
    features = _features(Path(features_dir), "features", ijb.images, "images.txt")
    _blas_threads()
    template_ids, pooled = pool_templates(features, ijb.face_image, ijb.face_template, ijb.face_media,
                                          detector=ijb.detector if params.detector_weight else None,
                                          keep_norm=params.keep_norm)
    i1, i2 = template_index(template_ids, ijb.pair_t1), template_index(template_ids, ijb.pair_t2)
    scores = pair_scores(pooled, i1, i2)
    ver = verification_metrics(scores, ijb.pair_label, params.fprs)
    codes, n_subjects, source = template_subjects(ijb, template_ids)
    weights = draw_weights(n_subjects, params.n_boot, params.seed)
    _check_genuine_subjects(ijb, codes[i1], codes[i2], source)
    boot = {}
    if params.n_boot:
        resampler = PairResampler(scores, ijb.pair_label, codes[i1], codes[i2], n_subjects, params.fprs)
        tprs = resampler.tpr(weights, progress=progress)
        boot = {tpr_name(f): tprs[:, j] for j, f in enumerate(params.fprs)}
    ident, ident_boot = _identification(ijb, template_ids, pooled, codes, weights, params)
    boot |= ident_boot if params.n_boot else {}
    values = {tpr_name(f): ver.tpr[f] for f in params.fprs}
    values |= {f"rank1_{name}": ident[name]["cmc"][1] for name in ident if 1 in ident[name]["cmc"]}
    metrics = {"values": values, "verification": {"tpr": ver.tpr, "threshold": ver.thresholds,
                                                  "supported": ver.supported, "auc": ver.auc,
                                                  "n_genuine": ver.n_pos, "n_impostor": ver.n_neg},
               "identification": ident, "templates": int(len(template_ids)), "pairs": int(len(scores)),
               "subjects": {"count": n_subjects, "from": source, "digest": _digest(codes, params)},
               "zero_templates": int((np.abs(pooled).sum(1) == 0).sum()), "params": _params(params)}
    with atomic_dir(out_dir) as tmp:
        _json(tmp / "metrics.json", _clean(metrics))
        ver.roc.to_csv(tmp / "roc.csv", index=False)
        np.savez(tmp / "bootstrap.npz", digest=metrics["subjects"]["digest"], **boot)
        if keep_scores:
            np.save(tmp / "scores.npy", scores)
    return metrics


def _params(params: ProtocolParams) -> dict:
    from dataclasses import asdict

    return asdict(params)


# -------------------------------------------------------------------------------- distractors
def _embed_aligned(root: Path, folder: str, paths: np.ndarray, model, saved, params: ProtocolParams, dev,
                   out: np.ndarray, *, desc: str, progress: bool) -> None:
    """Embed aligned crops (resized to the model's size) into ``out`` [n, D] (a memory map)."""
    import torch
    from tqdm import tqdm

    from pipeline.align import resize_crop

    size = int(saved["image_size"])
    grayscale = bool(saved["model_params"].get("grayscale", False))
    for start in tqdm(range(0, len(paths), params.batch_size), desc=desc, unit="batch", disable=not progress):
        crops = [resize_crop(load_crop(root / folder / p, f"listed in {root.name}"), size)
                 for p in paths[start:start + params.batch_size]]
        batch = torch.from_numpy(np.stack(crops))
        out[start:start + len(crops)] = _flip_embed(model, batch, params.flip, grayscale=grayscale, device=dev,
                                                    batch_size=params.batch_size)


def run_distractor_embed(model_path: str | Path, set_dir: str | Path, out_dir: str | Path,
                         params: ProtocolParams, *, device: str = "cpu", progress: bool = True) -> dict:
    """Embed the probe and distractor images of a distractor set folder; writes ``out_dir``
    (the distractor features are written straight to disk, never held whole in memory)."""
    data = read_distractor_set(set_dir, check_images=True)
    model, saved, dev = _load_model(model_path, device)
    dim = saved["model_params"]["embedding_size"] * (2 if params.flip == "concat" else 1)
    with atomic_dir(out_dir) as tmp:
        for stem, folder, paths in (("probes", PROBE_DIR, data.probes), ("distractors", DISTRACTOR_DIR,
                                                                          data.distractors)):
            out = np.lib.format.open_memmap(tmp / f"{stem}.npy", mode="w+", dtype=np.float32,
                                            shape=(len(paths), dim))
            _embed_aligned(data.root, folder, paths, model, saved, params, dev, out, desc=f"embed {stem}",
                           progress=progress)
            if not np.isfinite(out).all():
                raise ProtocolError(f"{model_path}: the model produced non-finite features for {stem}")
            out.flush()
            del out
            _write_lines(tmp / f"{stem}.txt", paths)
        info = {"model": str(model_path), "flip": params.flip, "probes": int(len(data.probes)),
                "distractors": int(len(data.distractors)), "dim": dim}
        _json(tmp / "info.json", info)
    return info


def run_distractor_eval(features_dir: str | Path, set_dir: str | Path, out_dir: str | Path,
                        params: ProtocolParams, *, progress: bool = True) -> dict:
    """Search every probe among the distractors for one run: CMC per gallery size, rank-1 and its
    identity resamples, TPR at ``distractor_fpr`` against the distractors."""
    data: DistractorSet = read_distractor_set(set_dir, check_images=False)
    probes = _features(Path(features_dir), "probes", data.probes)
    distractors = _features(Path(features_dir), "distractors", data.distractors)
    import torch

    torch.set_num_threads(cpu.thread_count())
    result = distractor_search(np.asarray(probes), data.identities, distractors, sizes=params.distractor_sizes,
                               max_rank=params.max_rank, fprs=(params.distractor_fpr,), chunk=params.chunk,
                               progress=progress)
    n_identities = int(result.pair_identity.max()) + 1
    weights = draw_weights(n_identities, params.n_boot, params.seed)
    boot = {"rank1": bootstrap_rate(result.correct, result.pair_identity, weights)} if params.n_boot else {}
    largest = result.sizes[-1]
    tpr_key = tpr_name(params.distractor_fpr)
    digest = _digest(np.unique(data.identities, return_inverse=True)[1], params)
    metrics = {"values": {"rank1": result.cmc[largest][1], tpr_key: result.tpr[params.distractor_fpr]},
               "cmc": result.cmc, "verification": {"tpr": result.tpr, "threshold": result.threshold,
                                                   "n_genuine": result.n_genuine, "n_impostor": result.n_impostor,
                                                   "supported": {params.distractor_fpr:
                                                                 result.tpr[params.distractor_fpr] is not None}},
               "searches": int(len(result.correct)), "probes": int(len(data.probes)),
               "distractors": int(len(data.distractors)), "timing": result.timing,
               "subjects": {"count": n_identities, "from": "probe identities", "digest": digest},
               "params": _params(params)}
    cmc = pd.DataFrame([{"distractors": n, **{f"rank{r}": v for r, v in ranks.items()}}
                        for n, ranks in result.cmc.items()])
    with atomic_dir(out_dir) as tmp:
        _json(tmp / "metrics.json", _clean(metrics))
        cmc.to_csv(tmp / "cmc.csv", index=False)
        np.savez(tmp / "bootstrap.npz", digest=digest, **boot)
    return metrics


# ---------------------------------------------------------------------------------- summary
def _run_record(folder: Path) -> tuple[dict, dict[str, np.ndarray], str]:
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise ProtocolError(f"{metrics_path}: file not found; run the eval stage first")
    metrics = json.loads(metrics_path.read_text())
    with np.load(folder / "bootstrap.npz") as saved:
        boot = {k: saved[k] for k in saved.files if k != "digest"}
        digest = str(saved["digest"])
    return metrics, boot, digest


def summarise(runs: dict[str, list[str | Path]], out_dir: str | Path, params: ProtocolParams, *,
              title: str = "") -> dict:
    """Intervals over runs and subject resamples for every metric, and paired Holm verdicts at
    ``verdict_fpr`` and rank-1 (``runs``: model -> its runs' eval folders, all on the same set);
    ``title``: the first line of summary.md (the benchmark and its files)."""
    values: dict[str, dict[str, list[float]]] = {}
    boots: dict[str, dict[str, list[np.ndarray]]] = {}
    digests = {}
    for model, folders in runs.items():
        if not folders:
            raise ProtocolError(f"summary: model {model!r} has no runs")
        for folder in map(Path, folders):
            metrics, boot, digest = _run_record(folder)
            digests[folder] = digest
            for name, value in metrics["values"].items():
                values.setdefault(name, {}).setdefault(model, []).append(math.nan if value is None else value)
                if name in boot:
                    boots.setdefault(name, {}).setdefault(model, []).append(boot[name])
    if len(set(digests.values())) > 1:
        first = next(iter(digests))
        other = next(f for f, d in digests.items() if d != digests[first])
        raise ProtocolError(f"{other}: its subject resamples differ from those of {first} (another set, "
                            "n_boot or seed); rerun its eval stage")
    intervals, verdicts = {}, {}
    for name, per_model in values.items():
        averaged = {m: np.mean(boots[name][m], axis=0) if name in boots and m in boots[name] else np.zeros(0)
                    for m in per_model}
        intervals[name] = {m: subject_interval(v, averaged[m], alpha=params.alpha) for m, v in per_model.items()}
        if (name == tpr_name(params.verdict_fpr) or name.startswith("rank1")) and len(per_model) > 1 \
                and all(averaged[m].size for m in per_model):
            verdicts[name] = paired_verdicts(per_model, averaged, alpha=params.alpha)
    summary = {"intervals": {n: {m: (None if iv is None else {"mean": iv.mean, "low": iv.low, "high": iv.high,
                                                              "per_run": list(iv.per_run), "n_runs": iv.n_runs})
                                 for m, iv in per_model.items()} for n, per_model in intervals.items()},
               "verdicts": {n: [{"a": d.a, "b": d.b, "diff": d.diff, "low": d.low, "high": d.high, "p": d.p,
                                 "p_holm": d.p_holm, "holm_low": d.holm_low, "holm_high": d.holm_high,
                                 "verdict": d.verdict} for d in ds] for n, ds in verdicts.items()},
               "method": "subject resamples (pairs of drawn subjects, impostor pairs weighted w_a * w_b) combined "
                         "with the run variance (pipeline.repeats.combine); verdicts paired on the same resamples, "
                         "Holm over the pairs of models"}
    summary = _clean(summary)
    with atomic_dir(out_dir) as tmp:
        _json(tmp / "summary.json", summary)
        (tmp / "summary.md").write_text(_markdown(summary, title, params))
    return summary


def _markdown(summary: dict, title: str = "", params: ProtocolParams | None = None) -> str:
    lines = [f"# {title}", ""] if title else []
    if params is not None:
        lines += [f"Regenerated by the bench_report stage; do not edit by hand. Each model: the mean over its runs "
                  f"with a {100 * (1 - params.alpha):.0f}% interval that holds both the variation between training "
                  f"runs and the sampling of subjects ({params.n_boot} subject resamples: every template, pair or "
                  "probe of a drawn subject; pipeline.protocols.subjects). Verdicts at TPR@FPR = "
                  f"{params.verdict_fpr:g} and rank-1: paired differences on the same resamples, Holm over the pairs "
                  "of models (per metric). A TPR at an FPR below 1 / (impostor pairs) is not computed (n/a).", ""]
    lines += ["| metric | model | mean [95%] | runs |", "|---|---|---|---|"]
    for name, per_model in summary["intervals"].items():
        for model, iv in per_model.items():
            if iv is None:
                text = "n/a (no value: e.g. an FPR level below what the impostor pairs support)"
            elif iv["low"] is None:
                text = f"{iv['mean']:.4f} (no interval: one run and no resamples)"
            else:
                text = f"{iv['mean']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]"
            lines.append(f"| {name} | {model} | {text} | {0 if iv is None else iv['n_runs']} |")
    for name, ds in summary["verdicts"].items():
        if not ds:
            continue
        lines.append("")
        lines.append(f"**{name}**: " + "; ".join(f"{d['verdict']} (Δ {d['diff']:+.4f}, Holm p {d['p_holm']:.3g})"
                                                  for d in ds))
    return "\n".join(lines) + "\n"
