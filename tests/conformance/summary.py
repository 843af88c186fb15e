"""Pass / total per backend x case family from a --junitxml report of the conformance suite:

    python -m pytest tests/conformance --junitxml=report.xml; python -m tests.conformance.summary report.xml
"""
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

ID = re.compile(r"test_(\w+)\[(\w+)-(\w+)-")


def table(path):
    counts = defaultdict(lambda: [0, 0, 0])  # (backend, family): passed, failed, skipped
    for case in ET.parse(path).iter("testcase"):
        m = ID.match(case.get("name", ""))
        if not m:
            continue
        _, backend, family = m.groups()
        outcome = 2 if case.find("skipped") is not None else 1 if (case.find("failure") is not None or case.find("error") is not None) else 0
        counts[(backend, family)][outcome] += 1
    backends = sorted({b for b, _ in counts}, key=["reference", "cpu", "triton", "cuda"].index)
    families = sorted({f for _, f in counts})
    lines = ["| backend | " + " | ".join(families) + " | all |", "|---" * (len(families) + 2) + "|"]
    for b in backends:
        cells, total = [], [0, 0, 0]
        for f in families:
            p, fail, skip = counts[(b, f)]
            total = [total[0] + p, total[1] + fail, total[2] + skip]
            cells.append(f"{p}/{p + fail}" + (f" ({skip} skipped)" if skip else ""))
        cells.append(f"{total[0]}/{total[0] + total[1]}" + (f" ({total[2]} skipped)" if total[2] else ""))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
