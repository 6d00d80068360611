"""Benchmarks beyond image pairs: IJB-B/C templates (1:1 and 1:N) and identification with distractors.

Modules (one job each):

* :mod:`.params` -- :class:`ProtocolParams`, the switches and sizes every function below takes.
* :mod:`.ijb` -- the released IJB-B / IJB-C files (``meta/<set>_face_tid_mid.txt``,
  ``_template_pair_label.txt``, ``_name_5pts_score.txt``, ``_1N_gallery_G1/G2`` (IJB-B:
  ``S1/S2``) and ``_1N_probe_mixed.csv``, ``loose_crop/``): reading, alignment with the
  given landmarks, embedding, template pooling and template-pair scores.
* :mod:`.verification` -- ROC, TPR at FPR and AUC of millions of scored pairs, from the
  genuine scores and the sorted impostor scores.
* :mod:`.identification` -- 1:N search of probe templates in a gallery (CMC, TPIR at FPIR)
  and the MegaFace-style search in a gallery of distractors (chunked matrix products with a
  running top-k; never a probes x gallery matrix in memory).
* :mod:`.subjects` -- intervals that resample subjects rather than pairs, combined with the
  variance between training runs (:mod:`pipeline.repeats`), and paired, Holm-corrected
  verdicts.
* :mod:`.stages` -- what a DVC stage calls: embed a set with a model, evaluate one run,
  summarise the runs of several models; each writes its folder atomically.

Every bad input raises :class:`ProtocolError` (a :class:`pipeline.datasets.DatasetError`, so the
command line prints it as one ``error: ...`` line) naming the file and line.
"""

from __future__ import annotations

from pipeline.datasets import DatasetError


class ProtocolError(DatasetError):
    """A protocol file or parameter that cannot be used (one line naming the file and line or key)."""
