"""Do two reports agree on which loss beats which? Compare two ``verdicts.csv`` files.

    python scripts/compare_verdicts.py reports/verdicts.csv seeds-345:reports/verdicts.csv

Each argument is a path, or ``REV:PATH`` for a file in a git commit or DVC experiment
(``git show`` reads it). Typical use: the default run against the same run with a
disjoint set of training seeds (``dvc exp run -S 'seeds.train=[3,4,5]'``), or against a
rerun on another host. For every pair of models in every test set (one scoring variant,
by default the primary ``cosine_norm``) it prints whether each report says "A beats B"
and classifies the pair:

* ``in both``: the same winner in both reports;
* ``only in first`` / ``only in second``: a winner in one, "not distinguishable" in the other;
* ``OPPOSITE``: each report names a different winner, which a sound comparison over
  training runs should never produce. The exit status is 1 when any pair is opposite.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
from pathlib import Path


def read_text(spec: str) -> str:
    """The text of ``spec``: a file path, or ``REV:PATH`` in git (when no such file exists)."""
    if Path(spec).is_file() or ":" not in spec:
        return Path(spec).read_text()
    shown = subprocess.run(["git", "show", spec], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"{spec}: cannot read it from git: {shown.stderr.strip()}")
    return shown.stdout


def winners(text: str, variant: str, source: str = "verdicts") -> dict[tuple[str, frozenset], str | None]:
    """(test set, {A, B}) -> the winner's name, or None for "not distinguishable"."""
    rows = list(csv.DictReader(io.StringIO(text)))
    need = {"test_set", "variant", "a", "b", "verdict"}
    if not rows or not need <= set(rows[0]):
        raise SystemExit(f"{source}: not a verdicts.csv (expected columns {sorted(need)})")
    out: dict[tuple[str, frozenset], str | None] = {}
    for row in rows:
        if row["variant"] != variant:
            continue
        parts = row["verdict"].split(" beats ")
        out[(row["test_set"], frozenset((row["a"], row["b"])))] = parts[0] if len(parts) == 2 else None
    return out


def compare(first: dict, second: dict) -> list[tuple[str, str, str]]:
    """One (test set, pair, class) per pair judged in either report, in a stable order."""
    result = []
    for key in sorted(set(first) | set(second), key=lambda k: (k[0], sorted(k[1]))):
        test_set, pair = key
        a, b = first.get(key), second.get(key)
        label = " vs ".join(sorted(pair))
        if key not in first or key not in second:
            kind = "missing in " + ("first" if key not in first else "second")
        elif a and b:
            kind = "in both" if a == b else "OPPOSITE"
        elif a:
            kind = "only in first"
        elif b:
            kind = "only in second"
        else:
            kind = "neither"
        if kind == "OPPOSITE":
            kind = f"OPPOSITE: {a} wins in the first, {b} in the second"
        elif a or b:
            kind = f"{kind}: {a or b} wins"
        result.append((test_set, label, kind))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--variant", default="cosine_norm")
    args = parser.parse_args(argv)
    first = winners(read_text(args.first), args.variant, args.first)
    second = winners(read_text(args.second), args.variant, args.second)
    rows = compare(first, second)
    print(f"first:  {args.first}\nsecond: {args.second}\nvariant: {args.variant}\n")
    for test_set, pair, kind in rows:
        if not kind.startswith("neither"):
            print(f"{test_set:16s} {pair:28s} {kind}")
    counts = {k: sum(1 for r in rows if r[2].startswith(k))
              for k in ("in both", "only in first", "only in second", "OPPOSITE", "neither")}
    print(f"\n{len(rows)} pairs: {counts['in both']} 'A beats B' in both, {counts['only in first']} only in the first, "
          f"{counts['only in second']} only in the second, {counts['OPPOSITE']} opposite, "
          f"{counts['neither']} not distinguishable in both")
    return 1 if counts["OPPOSITE"] else 0


if __name__ == "__main__":
    sys.exit(main())
