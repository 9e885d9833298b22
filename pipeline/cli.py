"""The pipeline's command line: one step, or all six in order into a work folder (see pipeline/__init__.py).

The exit status is 1 when some record failed (a rerun retries only those), 2 on an error the message explains
(bad flags, a missing or unreadable file: `python -m pipeline`), else 0.
"""

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.backends import Backend, LocalBackend, PipelineError
from pipeline.openai_http import OpenAIBackend
from pipeline.steps import step_caption, step_distill, step_metadata, step_rewrite, step_split, step_verify
from vlaa_min.infra.cli import ConfigError, build_parser, config_to_dict, print_config

STEPS = ("metadata", "caption", "distill", "rewrite", "verify", "split")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass
class PipelineConfig:
    input: str | None = field(default=None, metadata={"help": "the step's input JSONL (also --in); metadata: the "
                                                                "source file (JSON array or JSONL)"})
    out: str | None = field(default=None, metadata={"help": "the step's output JSONL (split: the SFT file)"})
    rl_out: str | None = field(default=None, metadata={"help": "split: the RL file"})
    source: str | None = field(default=None, metadata={"help": "all: the source file of (image, question, answer) "
                                                                 "records"})
    workdir: str | None = field(default=None, metadata={"help": "all: folder for every step's files"})
    images: str | None = field(default=None, metadata={"help": "images root the records' image paths are relative "
                                                                 "to (metadata, caption, split, all)"})
    verifier_type: str | None = field(default=None, metadata={"help": "metadata: reward type of source records "
                                                                        "without one (digit/mcq/math/iou/open)"})
    backend: str = field(default="openai", metadata={"help": "local:CHECKPOINT, openai (OPENAI_BASE_URL, "
                                                             "OPENAI_API_KEY) or openai:BASE_URL"})
    caption_backend: str | None = field(default=None, metadata={"help": "caption step's backend (default --backend)"})
    distill_backend: str | None = field(default=None, metadata={"help": "distill step's backend (default --backend)"})
    rewrite_backend: str | None = field(default=None, metadata={"help": "rewrite step's backend (default --backend)"})
    verify_backend: str | None = field(default=None, metadata={"help": "verify step's backend (default --backend)"})
    model: str | None = field(default=None, metadata={"help": "model name sent to an openai backend"})
    caption_model: str | None = field(default=None, metadata={"help": "captioner, e.g. gpt-4o (default --model)"})
    distill_model: str | None = field(default=None, metadata={"help": "reasoner, e.g. deepseek-r1 (default --model)"})
    rewrite_model: str | None = field(default=None, metadata={"help": "rewriter (default --model)"})
    verify_model: str | None = field(default=None, metadata={"help": "judge (default --model)"})
    caption_max_tokens: int = field(default=1024, metadata={"help": "caption length limit (tokens)"})
    distill_max_tokens: int = field(default=8192, metadata={"help": "reasoning trace limit; longer ones are dropped"})
    rewrite_max_tokens: int = field(default=8192, metadata={"help": "rewrite limit; longer ones are dropped"})
    verify_max_tokens: int = field(default=1024, metadata={"help": "judge reply limit"})
    temperature: float = field(default=0.0, metadata={"help": "caption / rewrite / verify temperature (0 = greedy)"})
    distill_temperature: float = field(default=0.6, metadata={"help": "reasoner temperature (R1's recommended 0.6)"})
    max_length_change: int = field(default=15, metadata={"help": "rewrite: drop when the length changes by more "
                                                                 "words (the paper: 15)"})
    batch_size: int = field(default=8, metadata={"help": "local backend: prompts per generation batch"})
    concurrency: int = field(default=8, metadata={"help": "openai backend: requests in flight"})
    timeout_s: float = field(default=600.0, metadata={"help": "openai backend: time limit of one request, from "
                                                               "connecting to the last byte (s)"})
    max_retries: int = field(default=5, metadata={"help": "openai backend: retries of a failed request"})
    backoff_s: float = field(default=2.0, metadata={"help": "openai backend: first retry delay, doubled each time"})
    device: str = field(default="auto", metadata={"help": "local backend: auto, cpu, cuda"})
    precision: str = field(default="auto", metadata={"help": "local backend: auto (bf16 on GPU), fp32, bf16"})
    seed: int = field(default=0, metadata={"help": "local backend: sampling seed"})

    def __post_init__(self):
        if self.max_length_change < 0 or self.batch_size < 1:
            raise ConfigError("--max-length-change must be >= 0 and --batch-size >= 1")


def _required(cfg: PipelineConfig, step: str, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(cfg, name) in (None, "")]
    if missing:
        raise PipelineError(f"step {step} needs {' '.join(missing)}")


def make_backend(spec: str, model: str | None, cfg: PipelineConfig) -> Backend:
    """A backend from a --backend spec: local:PATH, openai or openai:BASE_URL."""
    if spec.startswith("local:"):
        return LocalBackend(spec.removeprefix("local:"), device=cfg.device, precision=cfg.precision,
                            batch_size=cfg.batch_size, seed=cfg.seed)
    if spec == "openai" or spec.startswith("openai:"):
        if not model:
            raise PipelineError(f"backend {spec!r} needs a model name: --model (or --<step>-model)")
        base_url = spec.removeprefix("openai").removeprefix(":") or os.environ.get("OPENAI_BASE_URL") \
            or DEFAULT_OPENAI_BASE_URL
        return OpenAIBackend(base_url, model, os.environ.get("OPENAI_API_KEY"), concurrency=cfg.concurrency,
                             timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s)
    raise PipelineError(f"backend {spec!r}: expected local:PATH, openai or openai:BASE_URL")


class Backends:
    """The backend of each step, built once per (spec, model): a local checkpoint is loaded only once."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.built = cfg, {}

    def for_step(self, step: str) -> Backend:
        spec = getattr(self.cfg, f"{step}_backend") or self.cfg.backend
        model = None if spec.startswith("local:") else getattr(self.cfg, f"{step}_model") or self.cfg.model
        if (spec, model) not in self.built:
            self.built[spec, model] = make_backend(spec, model, self.cfg)
        return self.built[spec, model]


def run_step(step: str, cfg: PipelineConfig, backend_for_step, paths: dict[str, Path]) -> dict:
    """Run one step with the files in `paths` ("in", "out" and, for split, "rl"); backend_for_step(step) gives
    the backend of a model step."""
    config = {"step": step, **config_to_dict(cfg)}
    if step == "metadata":
        return step_metadata(paths["in"], paths["out"], cfg.images, cfg.verifier_type, config)
    if step == "caption":
        return step_caption(paths["in"], paths["out"], cfg.images, backend_for_step(step),
                            max_tokens=cfg.caption_max_tokens, temperature=cfg.temperature, config=config)
    if step == "distill":
        return step_distill(paths["in"], paths["out"], backend_for_step(step), max_tokens=cfg.distill_max_tokens,
                            temperature=cfg.distill_temperature, config=config)
    if step == "rewrite":
        return step_rewrite(paths["in"], paths["out"], backend_for_step(step), max_tokens=cfg.rewrite_max_tokens,
                            temperature=cfg.temperature, max_length_change=cfg.max_length_change, config=config)
    if step == "verify":
        return step_verify(paths["in"], paths["out"], backend_for_step(step), max_tokens=cfg.verify_max_tokens,
                           temperature=cfg.temperature, config=config)
    return step_split(paths["in"], paths["out"], paths["rl"], cfg.images, config)


def workdir_paths(workdir: Path, source: Path) -> dict[str, dict[str, Path]]:
    """The files of `all`: source -> 1_metadata.jsonl -> ... -> 5_verify.jsonl -> sft.jsonl + rl.jsonl."""
    numbered = [workdir / f"{number}_{step}.jsonl" for number, step in enumerate(STEPS[:-1], start=1)]
    paths = {step: {"in": step_in, "out": step_out}
             for step, step_in, step_out in zip(STEPS, [source, *numbered], [*numbered, workdir / "sft.jsonl"])}
    paths["split"]["rl"] = workdir / "rl.jsonl"
    return paths


def run_all(cfg: PipelineConfig, backend_for_step=None) -> dict[str, dict]:
    """All six steps in order into cfg.workdir; returns each step's stats (also in summary.json).

    backend_for_step(step) -> Backend; default: the backends the --*backend / --*model flags name."""
    workdir = Path(cfg.workdir)
    paths = workdir_paths(workdir, Path(cfg.source))
    if backend_for_step is None:
        backends = Backends(cfg)
        for step in ("caption", "distill", "rewrite", "verify"):
            backends.for_step(step)  # a missing --model fails now, not after hours of captioning
        backend_for_step = backends.for_step
    summary = {step: run_step(step, cfg, backend_for_step, paths[step]) for step in STEPS}
    lines = [f"{'step':<9} {'in':>7} {'kept':>7} {'dropped':>8} {'failed':>7}  dropped by reason"]
    for step, stats in summary.items():
        reasons = ", ".join(f"{reason} {count}" for reason, count in stats["dropped_by_reason"].items())
        lines.append(f"{step:<9} {stats['input']:>7} {stats['kept']:>7} {stats['dropped']:>8} {stats['failed']:>7}  "
                     f"{reasons}")
    lines.append(f"SFT file {paths['split']['out']} ({summary['split']['kept_by_file'][str(paths['split']['out'])]}), "
                 f"RL file {paths['split']['rl']} ({summary['split']['kept_by_file'][str(paths['split']['rl'])]})")
    print("\n".join(lines))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when some record failed and a rerun is needed)."""
    parser = build_parser(PipelineConfig, description="The six-step VLAA-Thinking data pipeline")
    parser.prog = "python -m pipeline"
    parser.add_argument("step", choices=(*STEPS, "all"), help="the step to run, or all six in order")
    parser.add_argument("--in", dest="input", default=argparse.SUPPRESS, help="same as --input")
    args = vars(parser.parse_args(argv))
    step = args.pop("step")
    cfg = PipelineConfig(**args)
    print(f"step: {step}")
    print_config(cfg)
    if step == "all":
        _required(cfg, step, "source", "images", "workdir")
        summary = run_all(cfg)
    else:
        _required(cfg, step, "input", "out", *(("images",) if step in ("metadata", "caption", "split") else ()),
                  *(("rl_out",) if step == "split" else ()))
        paths = {"in": Path(cfg.input), "out": Path(cfg.out), "rl": Path(cfg.rl_out) if cfg.rl_out else None}
        summary = {step: run_step(step, cfg, Backends(cfg).for_step, paths)}
    failed = sum(stats["failed"] for stats in summary.values())
    if failed:
        print(f"{failed} record(s) failed (see the failures above); rerun the same command to retry only them")
    return 1 if failed else 0
