"""An insightface ``.rec`` through the pipeline's pre-cropped path, against the same images in folders.

1. makes (once, cached under ``--work``) ``--images`` 112x112 JPEG faces of ``--identities``
   identities in a folder per identity: a pool of faces from the built-in renderer
   (``pipeline.datasets.synthetic``), each image a jittered copy of its identity's face (shift,
   rotation, scale, brightness, noise, mirror), JPEG quality 92;
2. writes them into ``train.rec``/``train.idx``/``property`` with the project's writer
   (:func:`pipeline.datasets.insightface.write_rec`): images/s and peak memory;
3. for the ``.rec`` and for the folders, in a fresh process each: list the set
   (:func:`~pipeline.datasets.insightface.load_rec`, which reads every record's header, or
   :func:`~pipeline.datasets.folder.list_identity_folder`), then what the detect, align and
   shard stages do with a pre-cropped set: :func:`pipeline.detect.precropped_set` (decode every
   image, keep it whole), :func:`pipeline.align.align_set` with ``Crop()`` (packed parts) and
   :func:`pipeline.shards.write_set` (Parquet). Wall time per step, images/s, and the process's
   peak resident memory (``ru_maxrss`` from ``wait4``), at ``--images`` and at a fifth of it,
   so the growth of memory with the number of images is measured, not guessed;
4. two reference figures for the ``.rec``: hashing every record's image bytes (what content
   keys for resumable chunks of a ``.rec`` set would read), and copying the records straight
   into Parquet parts without decoding (the floor for an already aligned set);
5. the label scan alone at ``--scan-records`` records (default 5.8 M, MS1M-ArcFace's count;
   tiny records, so the file is small): seconds and peak memory of ``load_rec``, measured;
6. projections to CASIA-WebFace (494,414 images) and MS1M-ArcFace (5.8 M), labelled as such:
   time linear in images at the measured rate, memory from the measured growth.

    FACEPIPE_THREADS=1 .venv/bin/python bench/bench_recordio.py | tee reports/benchmarks/recordio.txt

The load average is printed before and after every phase: on a shared machine the figures are
only as good as the machine was idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASIA, MS1M = 494_414, 5_800_000
POOL = 200  # rendered faces; identity i uses face i % POOL


# ----------------------------------------------------------------------------- data
def _jitter(face, rng):
    import cv2
    import numpy as np

    size = face.shape[0]
    angle, scale = rng.uniform(-6, 6), rng.uniform(0.96, 1.04)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-3, 3, 2)
    out = cv2.warpAffine(face, matrix, (size, size), borderMode=cv2.BORDER_REFLECT)
    out = out.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15) + rng.normal(0, 3, out.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out[:, ::-1] if rng.random() < 0.5 else out


def make_folder(root: Path, images: int, identities: int) -> None:
    """``root/<identity>/<k>.jpg``, written once (a ``.done`` marker)."""
    import cv2
    import numpy as np

    from pipeline.datasets import synthetic

    if (root / ".done").is_file():
        return
    faces = []
    for k in range(min(POOL, identities)):
        rng = np.random.default_rng(k)
        faces.append(synthetic.render_face(synthetic.sample_identity(rng, "a"), synthetic.sample_variation(rng, "a"),
                                           112)[:, :, ::-1])
    rng = np.random.default_rng(12345)
    per = np.full(identities, images // identities) + (np.arange(identities) < images % identities)
    for i, count in enumerate(per):
        folder = root / f"id{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            ok, encoded = cv2.imencode(".jpg", _jitter(faces[i % len(faces)], rng), [cv2.IMWRITE_JPEG_QUALITY, 92])
            (folder / f"{k:04d}.jpg").write_bytes(encoded.tobytes())
    (root / ".done").write_text("ok\n")


# ----------------------------------------------------------------------------- phases (child processes)
def phase_write_rec(folder: Path, rec: Path) -> dict:
    from pipeline.datasets.folder import list_identity_folder
    from pipeline.datasets.insightface import write_rec

    table = list_identity_folder(folder)
    names = sorted(table["identity"].unique())
    label = {name: k for k, name in enumerate(names)}
    items = ((label[i], Path(p).read_bytes()) for i, p in zip(table["identity"], table["path"]))
    t = time.perf_counter()
    done = write_rec(rec, items, len(names), 112)
    return {"seconds": time.perf_counter() - t, "images": done["images"], "rec_bytes": done["rec_bytes"]}


def phase_path(kind: str, source: Path, out: Path) -> dict:
    """List the set, then precropped detect, align (resize), shard: seconds per step."""
    import shutil

    from pipeline import cpu
    from pipeline.align import INDEX, Crop, align_set
    from pipeline.config import AlignParams, DetectParams, ShardParams
    from pipeline.detect import precropped_set
    from pipeline.io import write_csv
    from pipeline.shards import write_set

    shutil.rmtree(out, ignore_errors=True)
    threads = cpu.thread_count()
    steps = {}
    t = time.perf_counter()
    if kind == "rec":
        from pipeline.datasets.insightface import load_rec

        images = load_rec(source, progress=False, threads=threads).images
    else:
        from pipeline.datasets.folder import list_identity_folder

        images = list_identity_folder(source)
    steps["list"] = time.perf_counter() - t
    t = time.perf_counter()
    detections = precropped_set(images, DetectParams(), threads=threads)
    steps["detect"] = time.perf_counter() - t
    t = time.perf_counter()
    index = align_set(detections, out / "aligned", AlignParams(size=112), progress=False, crop=Crop(),
                      threads=threads)
    write_csv(out / "aligned" / INDEX, index)
    steps["align"] = time.perf_counter() - t
    t = time.perf_counter()
    manifest = write_set(out / "aligned", out / "shards", ShardParams(), None, progress=False, threads=threads)
    steps["shard"] = time.perf_counter() - t
    size = sum(f.stat().st_size for f in (out / "shards").glob("*.parquet"))
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": steps, "images": int(len(images)), "sharded": manifest["images"], "shard_bytes": size,
            "threads": threads}


def phase_rec_reference(rec: Path, out: Path) -> dict:
    """Hash every record's image bytes; copy the records into Parquet parts without decoding."""
    import hashlib
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.datasets.recordio import iter_records, read_index, unpack_image_record
    from pipeline.shards import SCHEMA

    index = read_index(rec / "train.idx")
    keep = index.keys > 0
    keys, offsets = index.keys[keep], index.offsets[keep]
    t = time.perf_counter()
    n = 0
    for _, _, payload in iter_records(rec / "train.rec", keys, offsets):
        label, image = unpack_image_record(payload)
        if image:
            hashlib.blake2b(image, digest_size=20).digest()
            n += 1
    hashing = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    batch: dict[str, list] = {name: [] for name in SCHEMA.names}
    part = copied = 0
    for key, offset, payload in iter_records(rec / "train.rec", keys, offsets):
        label, image = unpack_image_record(payload)
        if not image:
            continue
        identity = str(int(label if isinstance(label, float) else label[0]))
        for name, value in zip(SCHEMA.names, (image, str(key), identity, int(identity), f"train.rec#{offset}")):
            batch[name].append(value)
        copied += 1
        if len(batch["image"]) == 4096:
            pq.write_table(pa.table(batch, schema=SCHEMA), out / f"part-{part:05d}.parquet", row_group_size=1024)
            batch, part = {name: [] for name in SCHEMA.names}, part + 1
    if batch["image"]:
        pq.write_table(pa.table(batch, schema=SCHEMA), out / f"part-{part:05d}.parquet", row_group_size=1024)
    copying = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"hash_seconds": hashing, "hashed": n, "copy_seconds": copying, "copied": copied}


def phase_make_scan(rec: Path, records: int) -> dict:
    """A ``.rec`` of ``records`` tiny image records (2,000 classes), for the label scan."""
    from pipeline.datasets.insightface import write_rec

    if (rec / "property").is_file() and (rec / ".records").is_file() and \
            (rec / ".records").read_text().strip() == str(records):
        return {"seconds": 0.0, "cached": True}
    classes = 2000
    fake = b"\xff\xd8" + bytes(14)
    t = time.perf_counter()
    write_rec(rec, ((k * classes // records, fake) for k in range(records)), classes, 112)
    (rec / ".records").write_text(f"{records}\n")
    return {"seconds": time.perf_counter() - t, "cached": False}


def phase_scan(rec: Path) -> dict:
    from pipeline import cpu
    from pipeline.datasets.insightface import load_rec

    t = time.perf_counter()
    table = load_rec(rec, progress=False, threads=cpu.thread_count()).images
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "images": int(len(table)),
            "table_mib": float(table.memory_usage(deep=True).sum()) / 2**20}


PHASES = {
    "write-rec": lambda a: phase_write_rec(Path(a.folder), Path(a.rec)),
    "path-rec": lambda a: phase_path("rec", Path(a.rec), Path(a.out)),
    "path-folder": lambda a: phase_path("folder", Path(a.folder), Path(a.out)),
    "rec-reference": lambda a: phase_rec_reference(Path(a.rec), Path(a.out)),
    "make-scan": lambda a: phase_make_scan(Path(a.rec), a.records),
    "scan": lambda a: phase_scan(Path(a.rec)),
}


# ----------------------------------------------------------------------------- the parent
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_phase(name: str, **kwargs) -> dict:
    """Run one phase in a fresh process; add its peak RSS (MiB), CPU seconds and wall seconds."""
    args = [sys.executable, __file__, "--phase", name]
    for key, value in kwargs.items():
        args += [f"--{key}", str(value)]
    load_before = _load()
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"bench_recordio: phase {name} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(process_wall=time.perf_counter() - t, peak_mib=usage.ru_maxrss / 1024,
                  cpu_s=usage.ru_utime + usage.ru_stime, load_before=load_before, load_after=_load())
    return result


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report_paths(paths: dict, small: int, images: int) -> None:
    print("\n.rec vs folders through list -> precropped detect -> align (resize) -> shard "
          f"(threads {paths[('rec', images)]['threads']}):")
    print(f"{'source':8} {'images':>7} {'list s':>8} {'detect s':>9} {'align s':>8} {'shard s':>8} {'total s':>8} "
          f"{'img/s':>7} {'peak MiB':>9}  load before -> after")
    for (kind, n), r in sorted(paths.items(), key=lambda item: (item[0][1], item[0][0])):
        s = r["steps"]
        total = sum(s.values())
        print(f"{kind:8} {n:7d} {s['list']:8.1f} {s['detect']:9.1f} {s['align']:8.1f} {s['shard']:8.1f} {total:8.1f} "
              f"{_rate(n, total):7.0f} {r['peak_mib']:9.0f}  {r['load_before']} -> {r['load_after']}")
    for n in (small, images):
        rec, folder = paths[("rec", n)], paths[("folder", n)]
        ratio = sum(folder["steps"].values()) / sum(rec["steps"].values())
        print(f"ratio at {n} images: folder time / rec time = {ratio:.2f}")


def report_projections(paths: dict, small: int, images: int, scan: dict | None, write: dict) -> None:
    print("\nPROJECTIONS (not measured: time linear in images at the rates measured above on this machine and "
          "load; memory a + b * images from the two measured sizes):")
    for kind in ("rec", "folder"):
        big, little = paths[(kind, images)], paths[(kind, small)]
        slope = (big["peak_mib"] - little["peak_mib"]) / (images - small)
        for name, target in (("CASIA-WebFace", CASIA), ("MS1M-ArcFace", MS1M)):
            steps = {k: v / images * target for k, v in big["steps"].items()}
            memory = big["peak_mib"] + slope * (target - images)
            print(f"  PROJECTION {kind:6} {name:13} {target:>9,d} images: "
                  + ", ".join(f"{k} {_hms(v)}" for k, v in steps.items())
                  + f"; total {_hms(sum(steps.values()))}; peak ~{memory / 1024:.1f} GiB")
    for name, target in (("CASIA-WebFace", CASIA), ("MS1M-ArcFace", MS1M)):
        seconds = write["seconds"] / write["images"] * target
        print(f"  PROJECTION write_rec {name:13} {target:>9,d} images: {_hms(seconds)}")
    if scan:
        print(f"  (the label scan at {scan['images']:,} records is measured above, not projected)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--identities", type=int, default=2_000)
    parser.add_argument("--scan-records", type=int, default=MS1M, help="0: skip the large label scan")
    parser.add_argument("--work", type=Path, default=Path("/tmp/facepipe-recordio"))
    parser.add_argument("--phase", choices=sorted(PHASES))
    for name in ("folder", "rec", "out"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--records", type=int, default=0)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    from pipeline import cpu

    small = args.images // 5
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    print(f"date: {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}   commit: {commit.stdout.strip()}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {_cpu_model()}, {os.uname().machine}, {cpu.available_cores()} cores usable, FACEPIPE_THREADS="
          f"{os.environ.get('FACEPIPE_THREADS', '(unset)')}, {memory:.0f} GiB RAM, load average {_load()} "
          "(shared machine: other sessions' work runs alongside)")
    data = args.work / f"data-{args.images}"
    t = time.perf_counter()
    for n in (small, args.images):
        make_folder(args.work / f"data-{n}" / "folder", n, max(1, args.identities * n // args.images))
    print(f"data: {args.images} and {small} jittered 112x112 synthetic faces, {args.identities} and "
          f"{args.identities // 5} identities (made or found in {time.perf_counter() - t:.0f} s, not measured)")
    writes = {n: run_phase("write-rec", folder=args.work / f"data-{n}" / "folder", rec=args.work / f"data-{n}" / "rec")
              for n in (small, args.images)}
    write = writes[args.images]
    jpeg_bytes = sum(p.stat().st_size for p in (data / "folder").rglob("*.jpg"))
    print(f"write_rec: {write['images']} images in {write['seconds']:.1f} s = "
          f"{_rate(write['images'], write['seconds']):.0f} img/s, peak {write['peak_mib']:.0f} MiB (items streamed "
          "from the files); train.rec "
          f"{write['rec_bytes'] / 2**20:.1f} MiB for {jpeg_bytes / 2**20:.1f} MiB of JPEG "
          f"({jpeg_bytes / write['images']:.0f} bytes/image); load {write['load_before']} -> {write['load_after']}")
    paths = {}
    for n in (small, args.images):
        for kind in ("rec", "folder"):
            paths[(kind, n)] = run_phase(f"path-{kind}", folder=args.work / f"data-{n}" / "folder",
                                         rec=args.work / f"data-{n}" / "rec", out=args.work / f"out-{kind}-{n}")
    report_paths(paths, small, args.images)
    scan50 = paths[("rec", args.images)]["steps"]["list"]
    print(f"label scan inside load_rec at {args.images} records: {scan50:.2f} s = "
          f"{_rate(args.images, scan50):.0f} rec/s")
    ref = run_phase("rec-reference", rec=data / "rec", out=args.work / "out-reference")
    print(f"reference, .rec at {args.images}: hashing every record's image bytes {ref['hash_seconds']:.1f} s "
          f"({_rate(ref['hashed'], ref['hash_seconds']):.0f} img/s); copying records into Parquet parts without "
          f"decoding {ref['copy_seconds']:.1f} s ({_rate(ref['copied'], ref['copy_seconds']):.0f} img/s), peak "
          f"{ref['peak_mib']:.0f} MiB; load {ref['load_before']} -> {ref['load_after']}")
    scan = None
    if args.scan_records:
        made = run_phase("make-scan", rec=args.work / f"scan-{args.scan_records}", records=args.scan_records)
        scan = run_phase("scan", rec=args.work / f"scan-{args.scan_records}")
        print(f"label scan, measured at {scan['images']:,} records (tiny records; writing them took "
              f"{made['seconds']:.0f} s{' (cached)' if made['cached'] else ''}): load_rec {scan['seconds']:.1f} s = "
              f"{_rate(scan['images'], scan['seconds']):.0f} rec/s, peak {scan['peak_mib']:.0f} MiB, images table "
              f"{scan['table_mib']:.0f} MiB; load {scan['load_before']} -> {scan['load_after']}")
    report_projections(paths, small, args.images, scan, write)
    record = {"images": args.images, "small": small, "write_rec": write,
              "paths": {f"{k}-{n}": v for (k, n), v in paths.items()}, "reference": ref, "scan": scan}
    print("JSON " + json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main()
