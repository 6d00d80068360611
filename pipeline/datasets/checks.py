"""Cheap checks of a configured dataset's files, for ``python -m pipeline validate``.

Each adapter checks what it can without reading every image or every line of a large list
(:func:`pipeline.datasets.pairs_csv.check_header`, :func:`pipeline.datasets.lfw.check_layout`,
:func:`pipeline.datasets.folder.check_layout`), so a pairs CSV without ``path2`` or an LFW
``pairs.txt`` with a bad header stops ``validate`` (and every stage's params check) at once,
not the data stage after the synthetic set was generated.
"""

from __future__ import annotations

from typing import Any


def check_dataset_files(spec: Any) -> None:
    """Check the files of one dataset entry (a :class:`pipeline.config.DatasetSpec`); raises
    :class:`pipeline.datasets.DatasetError` with one line. Synthetic and ``download: true``
    entries have nothing on disk to check yet."""
    if spec.kind == "synthetic" or spec.download:
        return
    if spec.kind == "pairs_csv":
        from pipeline.datasets.pairs_csv import check_header

        check_header(spec.path, root=spec.root)
    elif spec.kind == "lfw":
        from pipeline.datasets.lfw import check_layout

        check_layout(spec.path, spec.pairs, folds=spec.folds)
    elif spec.kind == "folder":
        from pipeline.datasets.folder import check_layout

        check_layout(spec.path, min_images_per_identity=spec.min_images_per_identity)
    elif spec.kind == "insightface_rec":
        from pipeline.datasets.insightface import check_rec_layout

        check_rec_layout(spec.path)
    elif spec.kind == "insightface_bin":
        from pipeline.datasets.insightface import check_bin_file

        check_bin_file(spec.path)
