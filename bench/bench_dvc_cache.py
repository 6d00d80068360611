"""What DVC's cache link type costs for an output of many small files, and for the same bytes packed.

For each layout of one stage output (``loose``: ``--files`` files of ``--file-kb`` KiB, like
``data/aligned`` holding one JPEG per face; ``packed``: the same bytes in Parquet parts of
``--per-part`` records, like ``data/aligned`` now) and each ``cache.type`` (copy, hardlink,
symlink, and the fallback chain reflink,hardlink,symlink,copy), in a fresh git + DVC project:

* ``dvc commit`` (what ``dvc repro`` does after a stage runs): DVC hashes the output and
  transfers it into the cache; "then" is what it leaves in the workspace (a copy, or links)
  and "copy MiB" the data blocks of that copy (a second copy of the output beside the cache);
* ``dvc checkout`` after the output is deleted: what every fresh workspace pays, e.g. each
  queued experiment's (``dvc exp run --queue`` clones the repository into ``.dvc/tmp/exps/``
  and checks every output out of the cache before it runs);
* new disk space and inodes that checkout took (regular files with one link, in blocks;
  hard links and symlinks take no data blocks);
* ``dvc status`` with the output in place;
* ``dvc exp run --temp`` of a cheap downstream stage whose param changed: the whole queued
  experiment (temporary clone, checkout, run, commit), which is what ``dvc queue start`` does
  per experiment.

    .venv/bin/python bench/bench_dvc_cache.py [--files 20000] [--file-kb 4.3] [--per-part 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = '''
import os, sys, random
from pathlib import Path
layout, n, size, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(0)
blobs = [rng.randbytes(max(1, int(rng.gauss(size, size * 0.15)))) for _ in range(n)]
out = Path("out"); out.mkdir()
if layout == "loose":
    for k, blob in enumerate(blobs):
        d = out / f"id{k // 25:05d}"; d.mkdir(exist_ok=True)
        (d / f"{k:06d}.jpg").write_bytes(blob)
else:
    import pyarrow as pa, pyarrow.parquet as pq
    for p, start in enumerate(range(0, n, per)):
        chunk = blobs[start:start + per]
        names = [f"id{k // 25:05d}/{k:06d}.jpg" for k in range(start, start + len(chunk))]
        pq.write_table(pa.table({"file": names, "image": chunk}), out / f"part-{p:05d}.parquet")
'''
USE = '''
import yaml
from pathlib import Path
p = yaml.safe_load(open("params.yaml"))["p"]
files = sum(1 for f in Path("out").rglob("*") if f.is_file())
Path("result.txt").write_text(f"{p} {files}\\n")
'''
DVC_YAML = '''stages:
  make:
    cmd: python make.py {layout} {files} {size} {per}
    deps: [make.py]
    outs: [out]
  use:
    cmd: python use.py
    deps: [use.py, out]
    params: [p]
    outs: [result.txt]
'''


def env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")


def run(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def footprint(path: Path) -> tuple[float, int, str]:
    """(MiB of data blocks only this tree holds, inodes, how the files are linked)."""
    blocks = inodes = 0
    kinds = {"copy": 0, "hardlink": 0, "symlink": 0}
    for root, dirs, files in os.walk(path):
        inodes += len(dirs)
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if os.path.islink(os.path.join(root, name)):
                kinds["symlink"] += 1
                inodes += 1
            elif st.st_nlink > 1:
                kinds["hardlink"] += 1
            else:
                kinds["copy"] += 1
                blocks += st.st_blocks * 512
                inodes += 1
    main = max(kinds, key=kinds.get)
    return blocks / 2**20, inodes, main


def bench(layout: str, cache_type: str, args: argparse.Namespace, scratch: Path) -> dict:
    project = scratch / f"{layout}-{cache_type.replace(',', '_')}"
    project.mkdir()
    (project / "make.py").write_text(MAKE)
    (project / "use.py").write_text(USE)
    (project / "params.yaml").write_text("p: 1\n")
    (project / "dvc.yaml").write_text(DVC_YAML.format(layout=layout, files=args.files, size=int(args.file_kb * 1024),
                                                      per=args.per_part))
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "config", "cache.type", cache_type], project)
    run([sys.executable, "make.py", layout, str(args.files), str(int(args.file_kb * 1024)), str(args.per_part)],
        project)
    files = sum(1 for f in (project / "out").rglob("*") if f.is_file())
    out_mib = sum(f.stat().st_size for f in (project / "out").rglob("*") if f.is_file()) / 2**20
    commit = run(["dvc", "commit", "--force", "--quiet", "make"], project)
    committed_mib, _, committed_as = footprint(project / "out")  # what the commit left in the workspace
    run(["dvc", "repro", "--quiet", "use"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.email=b@example.com", "-c", "user.name=bench", "commit", "-q", "-m", "base"], project)
    status = run(["dvc", "status", "--quiet"], project)
    shutil.rmtree(project / "out")
    checkout = run(["dvc", "checkout", "--quiet"], project)
    extra_mib, inodes, linked = footprint(project / "out")
    status_after = run(["dvc", "status", "--quiet"], project)
    experiment = run(["dvc", "exp", "run", "--temp", "--quiet", "-S", "p=2"], project)
    return {"layout": layout, "cache_type": cache_type, "files": files, "out_mib": out_mib, "commit_s": commit,
            "committed_as": committed_as, "committed_mib": committed_mib,
            "checkout_s": checkout, "linked": linked, "extra_mib": extra_mib, "inodes": inodes,
            "status_s": status_after, "status_first_s": status, "exp_temp_s": experiment}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--file-kb", type=float, default=4.3, help="mean file size (KiB): a 112 px face at JPEG q95")
    parser.add_argument("--per-part", type=int, default=2000, help="records per packed part (align.chunk_size)")
    parser.add_argument("--types", default="copy;hardlink;symlink;reflink,hardlink,symlink,copy;hardlink,symlink,copy")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="facepipe-dvc-cache-", dir=args.scratch))
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(scratch)], capture_output=True, text=True).stdout.strip()
    dvc_version = subprocess.run(["dvc", "--version"], env=env(), capture_output=True, text=True).stdout.strip()
    print(f"DVC {dvc_version}, scratch {scratch} on {fs}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.files} records of ~{args.file_kb} KiB; packed: parts of {args.per_part} records\n")
    print(f"{'layout':<7} {'cache.type':<30} {'files':>6} {'MiB':>6} {'commit s':>9} {'then':>9} {'copy MiB':>8} "
          f"{'checkout s':>11} "
          f"{'linked as':>9} {'new MiB':>8} {'inodes':>7} {'status s':>9} {'exp --temp s':>13}")
    try:
        for layout in ("loose", "packed"):
            for cache_type in args.types.split(";"):
                r = bench(layout, cache_type, args, scratch)
                print(f"{r['layout']:<7} {r['cache_type']:<30} {r['files']:>6} {r['out_mib']:>6.1f} "
                      f"{r['commit_s']:>9.1f} {r['committed_as']:>9} {r['committed_mib']:>8.1f} "
                      f"{r['checkout_s']:>11.1f} {r['linked']:>9} {r['extra_mib']:>8.1f} "
                      f"{r['inodes']:>7} {r['status_s']:>9.1f} {r['exp_temp_s']:>13.1f}", flush=True)
                shutil.rmtree(scratch / f"{layout}-{cache_type.replace(',', '_')}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
