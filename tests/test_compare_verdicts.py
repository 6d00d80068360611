"""scripts/compare_verdicts.py: classifies each pair of losses across two verdict files."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_verdicts", ROOT / "scripts" / "compare_verdicts.py")
compare_verdicts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_verdicts)

HEADER = "test_set,variant,a,b,auc_diff,diff_low,diff_high,df,p,p_holm,verdict\n"


def _file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{s},{v},{a},{b},0,0,0,1,0,0,{verdict}\n" for s, v, a, b, verdict in rows))
    return str(path)


def test_pairs_are_matched_whatever_the_order_and_classified(tmp_path, capsys):
    first = _file(tmp_path, "first.csv", [
        ("open", "cosine_norm", "softmax", "triplet", "softmax beats triplet"),
        ("open", "cosine_norm", "center", "cosface", "center beats cosface"),
        ("open", "cosine_norm", "arcface", "cosface", "not distinguishable"),
        ("open", "l2_raw", "arcface", "cosface", "cosface beats arcface"),  # other variant: ignored
    ])
    second = _file(tmp_path, "second.csv", [
        ("open", "cosine_norm", "triplet", "softmax", "softmax beats triplet"),  # same pair, A/B swapped
        ("open", "cosine_norm", "center", "cosface", "not distinguishable"),
        ("open", "cosine_norm", "arcface", "cosface", "arcface beats cosface"),
    ])
    assert compare_verdicts.main([first, second]) == 0
    out = capsys.readouterr().out
    assert "softmax vs triplet" in out and "in both: softmax wins" in out
    assert "center vs cosface" in out and "only in first: center wins" in out
    assert "only in second: arcface wins" in out
    assert "3 pairs: 1 'A beats B' in both, 1 only in the first, 1 only in the second, 0 opposite" in out


def test_opposite_winners_fail(tmp_path, capsys):
    first = _file(tmp_path, "a.csv", [("open", "cosine_norm", "softmax", "triplet", "softmax beats triplet")])
    second = _file(tmp_path, "b.csv", [("open", "cosine_norm", "triplet", "softmax", "triplet beats softmax")])
    assert compare_verdicts.main([first, second]) == 1
    assert "OPPOSITE: softmax wins in the first, triplet in the second" in capsys.readouterr().out
