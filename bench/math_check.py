"""What the math reward's time limit costs per check (rewards/math_check.py), against the ways it could be done.

Each check is a Math-Verify equivalence test of a short answer. The time limit runs each check in a child process
that lives across checks; a child forked per check would instead pay a fork, and a child forked before the parent
warmed up pays Math-Verify's first-use costs inside its deadline.

    python bench/math_check.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rewards import math_check  # noqa: E402

PAIRS = [("0.5", "\\frac{1}{2}"), ("x+1", "\\{1, 2\\}"), ("[0,1)", "[0, 1)"), ("2^{1/2}", "\\sqrt{2}")] * 25


def ms_per_check(check) -> float:
    start = time.perf_counter()
    for answer, gt in PAIRS:
        check(answer, gt)
    return 1000 * (time.perf_counter() - start) / len(PAIRS)


if __name__ == "__main__":
    cold = math_check._Checker()  # forked before the warm-up
    start = time.perf_counter()
    cold.check("0.5", "\\frac{1}{2}", timeout_s=60.0)
    print(f"first check in a child forked cold:  {1000 * (time.perf_counter() - start):.0f} ms")
    math_check.warm_up()
    print(f"in this process, with no time limit: {ms_per_check(math_check._math_check):.1f} ms/check")
    print(f"check_math (a warm child, reused):   "
          f"{ms_per_check(lambda a, g: math_check.check_math(a, g, timeout_s=5.0)):.1f} ms/check")
    print(f"a fresh child forked per check:      "
          f"{ms_per_check(lambda a, g: math_check._Checker().check(a, g, timeout_s=5.0)):.1f} ms/check")
    print(f"\ncommand: python {' '.join(sys.argv)}")
