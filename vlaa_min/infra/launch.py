"""torchrun, without its traceback when the workers stopped on an error they already explained in one line.

    python -m vlaa_min.infra.launch --standalone --nproc_per_node 2 train_grpo.py --model ...   (torchrun's flags)

`make sft` / `make grpo` with NPROC=N launch through this. A worker that meets bad input (a flag, a path, a data
record, a refused resume) prints "error: ..." and exits with EXPECTED_ERROR (vlaa_min.infra.cli.run_script).
torchrun would then log the failed worker and end in a ChildFailedError traceback of its own, 30 lines that say
nothing more. Here, when the first worker to fail exited with EXPECTED_ERROR (the others are stopped after it), the
launcher exits with EXPECTED_ERROR and adds nothing. Any other failure -- a bug's traceback, a crash, a kill -- gets
torchrun's full report, as before.
"""

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from vlaa_min.infra.cli import EXPECTED_ERROR


class _HideExpectedFailure(logging.Filter):
    """Drop torchrun's "failed (exitcode: 2) local_rank: ..." line: the worker's own message says why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg.startswith("failed (exitcode: ") and record.args and record.args[0] == EXPECTED_ERROR)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_HideExpectedFailure())
    try:
        run(parse_args(argv))
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        if first.exitcode == EXPECTED_ERROR:
            return EXPECTED_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
