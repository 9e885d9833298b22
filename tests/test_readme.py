"""The README's code references hold: every `name` (path:line) points at a line of that file that holds the name,
so the reading order and the objective's equations lead to the lines that compute them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`([^`]+)` \(([\w./]+\.py):(\d+)\)")  # `group_advantages` (vlaa_min/grpo_loss.py:41)


def test_every_line_reference_of_the_readme_points_at_its_name():
    references = REFERENCE.findall((ROOT / "README.md").read_text())
    assert len(references) >= 15, references
    for name, path, line in references:
        lines = (ROOT / path).read_text().splitlines()
        assert int(line) <= len(lines), (name, path, line)
        assert name in lines[int(line) - 1], f"{path}:{line} does not hold {name!r}"
