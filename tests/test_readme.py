"""The README's API tour is code users paste: it must run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    ns = {}
    exec(compile(blocks[0], "README.md (API tour)", "exec"), ns)
    assert ns["traj"].shape == (4, 16, 64) and ns["res"].nfe == 25


def test_readme_stays_short():
    """The README is the front page: details belong in docs/."""
    assert len(README.read_text().splitlines()) <= 300


def test_local_r2_tables_match_the_result_files():
    """The README's and docs/local_score.md's r^2 numbers of the explain --local run are its CSVs,
    rounded half up to 3 decimals."""
    import csv
    import statistics
    from decimal import ROUND_HALF_UP, Decimal

    root = README.parent
    results = root / "benchmarks" / "results" / "local_explain_2026-12-07"
    r3 = lambda v: str(Decimal(str(v)).quantize(Decimal("0.001"), ROUND_HALF_UP))
    rows = []
    for r in csv.DictReader((results / "local_r2.csv").open()):
        cells = [r3(r[f"r2_{k}"]) for k in ("gaussian", "mixture", "delta")]
        cells += [f"{r3(r['r2_' + k])} ({r['P_' + k]})" for k in ("ls", "els", "bbels")]
        rows.append((f"{float(r['sigma']):.3g}", cells))
    paths = list(csv.DictReader((results / "local_case_by_case.csv").open()))
    median = {k: r3(statistics.median(float(p[f"r2_{k}"]) for p in paths))
              for k in ("gaussian", "mixture", "delta", "ls", "els", "bbels")}
    for doc in (README, root / "docs" / "local_score.md"):
        text = doc.read_text().replace("**", "")
        for sigma, cells in rows:
            assert f"| {sigma} | " + " | ".join(cells) + " |" in text, (doc.name, sigma)
        for k in median.values():
            assert k in text, (doc.name, k)
    readme = README.read_text()
    for name, k in (("LS", "ls"), ("BB-ELS", "bbels"), ("ELS", "els"), ("ideal", "delta"), ("10-mixture", "mixture"),
                    ("Gaussian", "gaussian")):
        assert re.search(rf"{re.escape(name)}\*{{0,2}} {re.escape(median[k])}\b", readme), (name, median[k])
