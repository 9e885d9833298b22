"""The six-step VLAA-Thinking data pipeline: (image, question, answer) records -> SFT and RL files for our trainers.

Each step reads one JSONL file and writes one (split writes two), in data.py's record format:

    1 metadata  import a source file (JSON array or JSONL); every record validated by data.py
    2 caption   a vision model writes a detailed caption of each image                          -> "caption"
    3 distill   a text-only reasoner gets caption + question and answers as if it saw the image -> "ds_answer",
                "answer" = <think>..</think> <answer>..</answer>
    4 rewrite   an LLM removes mentions of a caption / description / rationale (dropped if the length changes
                by more than 15 words, a mention remains, or the tags break)
    5 verify    an LLM judge compares the final answer with the ground truth (Yes / No); only Yes is kept
    6 split     traces with an "aha" word -> RL file, the rest -> SFT file

The files: steps.py (the steps and their text rules), prompts.py, backends.py (the interface and the local
backend: our engine on a checkpoint), openai_http.py (any OpenAI-compatible server), step_files.py (resumable
outputs), cli.py (the command line). Every step is resumable: rerun the same command after a crash.

Usage:
    python -m pipeline all --source toy/rl.json --images toy/images --workdir runs/pipeline \
        --backend local:runs/base/model
    export OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=...
    python -m pipeline all --source raw.jsonl --images images --workdir runs/pipeline --backend openai \
        --caption-model gpt-4o --distill-model deepseek-r1 --rewrite-model gpt-4o-mini --verify-model gpt-4o-mini
    python -m pipeline caption --in runs/pipeline/1_metadata.jsonl --out runs/pipeline/2_caption.jsonl \
        --images images --backend openai --model gpt-4o        # one step at a time
"""

from pipeline.backends import Backend, BackendError, ChatRequest, ChatResult, LocalBackend, PipelineError
from pipeline.cli import STEPS, PipelineConfig, main, make_backend, run_all, run_step, workdir_paths
from pipeline.openai_http import OpenAIBackend
from pipeline.step_files import FAILURES_IN_A_ROW_TO_STOP, Outcome, StepOutput, read_jsonl, sidecar
from pipeline.steps import (aha_words, length_change, mentions, parse_reasoning, parse_verdict, step_caption,
                            step_distill, step_metadata, step_rewrite, step_split, step_verify, word_count)
