"""Command-line flags derived from a script's config dataclass (one source of truth).

Every script (train_sft.py, train_grpo.py, evaluate.py, ...) keeps its settings in one dataclass. This module turns
that dataclass into argparse flags -- one `--field-name` per field, typed from the annotation, with the help text
taken from the field's `metadata["help"]` -- and back, and saves the resolved config next to the run.

    @dataclass
    class Config:
        lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    cfg = parse_config(Config)          # python script.py --lr 3e-5

A script's entry point is `run_script(main, Config, doc)`: a `UserError` (bad flags, paths or data, a refused
resume, a run that cannot go on) ends the process with its message -- one line, or a short list -- and exit code
EXPECTED_ERROR (2), not a traceback; under torchrun every rank does (vlaa_min.infra.launch keeps torchrun quiet
about it). A misspelt flag is answered with the closest real one ("unknown flag --lerning-rate; did you mean
--lr?", exit code 2, argparse's). Any other exception is a bug and keeps its traceback (exit code 1).
"""

import argparse
import dataclasses
import difflib
import json
import os
import signal
import sys
import typing

from vlaa_min.infra import distributed
from vlaa_min.presets import presets_of

EXPECTED_ERROR = 2  # the exit code of an error whose message says what to fix (argparse's too); a bug exits 1


class UserError(Exception):
    """Bad input or a run that cannot go on: the message says what and where; no traceback is shown."""


class ConfigError(UserError, ValueError):
    """A flag value that cannot work: the message names the flag."""


def check_sizes(config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the first field of `positive` that is <= 0 or of `non_negative` that is < 0."""
    for name in positive + non_negative:
        value, strict = getattr(config, name), name in positive
        if not (value > 0 if strict else value >= 0):  # NaN fails both
            raise ConfigError(f"--{name.replace('_', '-')} must be {'> 0' if strict else '>= 0'}, got {value}")


def str_to_bool(text: str) -> bool:
    """Real bool parsing: `--flag false` must mean False (argparse's type=bool would make it True)."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _flag_type(annotation):
    """The argparse `type` for a field annotation; Optional[X] and `X | None` parse as X ('none' gives None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and len(args) < len(typing.get_args(annotation)):  # an Optional: accept 'none'
        inner = _flag_type(args[0])
        return lambda text: None if text.strip().lower() in ("none", "null", "") else inner(text)
    if annotation is bool:
        return str_to_bool
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"unsupported config field type {annotation!r}: use bool, int, float, str or Optional of one")


def closest_flag(name: str, actions) -> str | None:
    """The flag `name` was probably meant to be: the closest flag name, else the flag whose help text holds the
    closest phrase (--lerning-rate -> --lr, whose help says "peak learning rate")."""
    flags = {flag: action for action in actions for flag in action.option_strings if flag.startswith("--")}
    match = difflib.get_close_matches(name, flags, n=1)
    if match:
        return match[0]
    words = name.lstrip("-").replace("-", " ").replace("_", " ").lower()
    width = len(words.split())

    def phrase_score(action) -> float:
        text = (action.help or "").lower().split()
        phrases = [" ".join(text[i : i + width]) for i in range(max(len(text) - width + 1, 1))]
        return max(difflib.SequenceMatcher(None, words, phrase).ratio() for phrase in phrases)

    score, flag = max(((phrase_score(action), flag) for flag, action in flags.items()), default=(0.0, None))
    return flag if score >= 0.8 else None


class FlagParser(argparse.ArgumentParser):
    """argparse, but an unknown flag gets a suggestion instead of a bare "unrecognized arguments"."""

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        unknown = [arg.split("=")[0] for arg in extras if arg.startswith("--")]
        if unknown:
            guess = closest_flag(unknown[0], self._actions)
            self.error(f"unknown flag {unknown[0]}" + (f"; did you mean {guess}?" if guess else
                                                      f" ({self.prog} --help lists the flags)"))
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def build_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    parser = FlagParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_flag_type(hints[field.name]),
            default=default,
            metavar=hints[field.name].__name__.upper() if hasattr(hints[field.name], "__name__") else "VALUE",
            help=field.metadata.get("help", " ").replace("%", "%%"),  # argparse %-formats help strings
        )
    return parser


def parse_config(config_cls, argv: list[str] | None = None, description: str | None = None):
    """Parse argv into an instance of config_cls (runs its __post_init__ checks). A class with named recipes in
    vlaa_min.presets also takes `--preset NAME`: the preset's values replace the defaults, flags override both."""
    parser = build_parser(config_cls, description)
    recipes = presets_of(config_cls)
    if recipes:
        preset_flag = dict(choices=sorted(recipes), default=None,
                           help="a named recipe (vlaa_min/presets.py); other flags override its values, and with "
                                "it --help shows its values as the defaults")
        parser.add_argument("--preset", **preset_flag)
        # --preset alone first (no --help here), so that --help already shows the preset's values
        preset_only = argparse.ArgumentParser(prog=parser.prog, add_help=False)
        preset_only.add_argument("--preset", **preset_flag)
        chosen = preset_only.parse_known_args(argv)[0].preset
        parser.set_defaults(**recipes.get(chosen, {}))
    args = vars(parser.parse_args(argv))
    args.pop("preset", None)
    try:
        return config_cls(**args)
    except ConfigError as error:
        parser.error(str(error))  # usage line + message, exit code 2


def stop_like_ctrl_c(signum, frame) -> None:
    """A signal handler: raise KeyboardInterrupt, as Ctrl-C does. Unwinding runs the clean-up a kill skips: open
    files are closed, half-written checkpoints removed, worker processes ended; the last checkpoint resumes."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_script(main, config_cls, doc: str) -> None:
    """The `if __name__ == "__main__"` of a script: parse the flags, run main, print a UserError without traceback.
    SIGTERM (what `timeout`, Slurm and `docker stop` send) stops main as Ctrl-C does; either stop prints one line
    and exits with 128 + the signal's number (130, 143)."""
    config = parse_config(config_cls, description=doc.split("\n")[0])
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        main(config)
    except KeyboardInterrupt as stop:
        name = str(stop) or "SIGINT"  # Ctrl-C's KeyboardInterrupt carries no name
        print(f"stopped by {name}; a training run continues from its last checkpoint with the same command plus "
              f"--resume true", file=sys.stderr)
        sys.exit(128 + signal.Signals[name])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXPECTED_ERROR)
    finally:
        distributed.shutdown()  # under torchrun: leave the process group cleanly


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def print_config(config) -> None:
    print(f"{type(config).__name__}:")
    for key, value in config_to_dict(config).items():
        print(f"  {key:<28} {value!r}")


def save_config(config, path: str) -> None:
    """Write the resolved config (a dataclass or a dict) as JSON, atomically: never a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config if isinstance(config, dict) else config_to_dict(config), f, indent=2)
    os.replace(tmp, path)


def load_config(config_cls, path: str):
    """The config a run saved with save_config, as config_cls (other saved keys, e.g. input hashes, are left out)."""
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: is the run folder finished?")
    with open(path) as f:
        saved = json.load(f)
    return config_cls(**{f.name: saved[f.name] for f in dataclasses.fields(config_cls) if f.name in saved})
