"""`python -m pipeline STEP ...`: run one step of the data pipeline, or all six (see pipeline/__init__.py)."""

import sys

from pipeline.backends import BackendError, PipelineError
from pipeline.cli import main
from vlaa_min.infra.cli import EXPECTED_ERROR, UserError

try:
    sys.exit(main())
except (PipelineError, BackendError, UserError) as error:  # UserError: data.DataError, a flag's ConfigError
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXPECTED_ERROR)
except KeyboardInterrupt:
    sys.exit("interrupted: every finished record is saved; rerun the same command to continue")
