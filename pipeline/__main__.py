"""`python -m pipeline STEP ...`: run one step of the data pipeline, or all six (see pipeline/__init__.py)."""

import sys

import data
from pipeline.backends import BackendError, PipelineError
from pipeline.cli import main

try:
    sys.exit(main())
except (PipelineError, BackendError, data.DataError) as error:
    sys.exit(f"error: {error}")
except KeyboardInterrupt:
    sys.exit("interrupted: every finished record is saved; rerun the same command to continue")
