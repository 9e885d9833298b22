"""Render a GRPO run's rollout log as one self-contained HTML page: open it in any browser, no server needed.

Reads <run>/rollouts.jsonl (written by train_grpo.py, see vlaa_min/rollout_log.py), <run>/metrics.jsonl and
<run>/config.json (and <run>/eval.json, the held-out accuracy before and after), and writes <run>/rollouts.html:
inline CSS and JS (vlaa_min/viewer.html), the data as one JSON block, and each prompt image once, as a small inline
JPEG thumbnail. The page shows a step slider beside the curves (reward, accuracy, held-out accuracy, the share of
no-signal groups); per logged group its G completions as cards sorted by reward (reward, reason, advantage),
their tokens shaded by A * (ratio - 1), the ratio taken after the whole step's update, with log pi_old, ratio and
KL on hover; groups whose rewards are all equal are marked "no signal"; a toggle shows each prompt logged at two
steps at its first and last one (held-out answers are logged at every eval, so before and after GRPO). Only the
current step's cards are built.

    python -m vlaa_min.view runs/grpo                    # or: make view RUN=runs/grpo
    python -m vlaa_min.view runs/grpo --images /data/images --out /tmp/grpo.html
"""

import base64
import io
import json
import os
from pathlib import Path

from PIL import Image, ImageOps

from vlaa_min.infra.cli import FlagParser
from vlaa_min.metrics import read_metrics

TEMPLATE = Path(__file__).with_name("viewer.html")
CURVE_KEYS = ("reward", "accuracy", "kl", "completion_length", "frac_reward_zero_std")


def thumbnail(path: Path, size: int = 128) -> str | None:
    """A data: URI of a JPEG no larger than size x size, or None when the file cannot be read."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")  # upright, as the model saw it (data.load_image)
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=75)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def page_data(run: str, images_root: str | None = None) -> dict:
    """Everything the page shows: the log entries, a few metrics per step, and one thumbnail per image."""
    log_path = os.path.join(run, "rollouts.jsonl")
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f"{log_path}: no rollout log; train with --log-rollouts-every N (N > 0)")
    entries = read_metrics(log_path, skip_bad=True)  # metrics.jsonl's rules; a corrupt line: skipped, with a warning
    config_path = os.path.join(run, "config.json")
    config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
    if images_root is None:
        images_root = config.get("images", "")
    images = {}
    for entry in entries:
        for group in entry["groups"]:
            if group.get("image") and group["image"] not in images:
                images[group["image"]] = thumbnail(Path(images_root) / group["image"])
    missing = [path for path, uri in images.items() if uri is None]
    if missing:
        print(f"warning: {len(missing)} image(s) not readable under {images_root!r} (e.g. {missing[0]}); the page "
              f"shows those prompts without a thumbnail (pass --images ROOT)")
    rows = read_metrics(os.path.join(run, "metrics.jsonl"), skip_bad=True)
    metrics = [{key: row[key] for key in ("step", *CURVE_KEYS) if key in row} for row in rows]
    return {"run": os.path.basename(os.path.normpath(run)), "entries": entries, "metrics": metrics,
            "heldout": held_out_points(run, rows, config.get("steps")),
            "images": {path: uri for path, uri in images.items() if uri}}


def held_out_points(run: str, rows: list[dict], steps: int | None) -> list[dict]:
    """Held-out accuracy by step: before GRPO (step 0) and after it (the last step) from <run>/eval.json, which a
    finished run writes, and the --eval-every ones from metrics.jsonl."""
    accuracy = {row["step"]: row["eval_accuracy"] for row in rows if "eval_accuracy" in row}
    eval_path = os.path.join(run, "eval.json")
    if os.path.isfile(eval_path):
        with open(eval_path) as f:
            history = json.load(f)
        accuracy[0] = history["before"]["accuracy"]
        accuracy[steps or max((row["step"] for row in rows), default=0)] = history["after"]["accuracy"]
    return [{"step": step, "accuracy": value} for step, value in sorted(accuracy.items())]


def render(data: dict) -> str:
    """The page: the template with the data inlined ("<" escaped, so no text can close the script block)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = data["run"].replace("&", "&amp;").replace("<", "&lt;")
    return TEMPLATE.read_text(encoding="utf-8").replace("__TITLE__", title).replace("__DATA__", payload)


def main(argv: list[str] | None = None) -> str:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder holding rollouts.jsonl (e.g. runs/grpo)")
    parser.add_argument("--out", help="HTML file to write (default: <run>/rollouts.html)")
    parser.add_argument("--images", help="images root (default: the run's config.json 'images')")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run, "rollouts.html")
    try:
        html = render(page_data(args.run, args.images))
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    with open(out, "w", encoding="utf-8") as f:
        f.write(html)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB): open it in a browser")
    return out


if __name__ == "__main__":
    main()
