"""The README's API tour is code users paste: it must run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    ns = {}
    exec(compile(blocks[0], "README.md (API tour)", "exec"), ns)
    assert ns["traj"].shape == (4, 16, 64) and ns["res"].nfe == 25
