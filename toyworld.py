"""The offline toy world: procedurally drawn shape scenes with questions of all five reward types.

It is the embedded default data set of vlaa-min (no downloads, deterministic from a seed) and it is written in
the VLAA-Thinking record format, so training and evaluation read it through the same data.py code path as the
real data set.

Images: 112x112 RGB, white, a 4x4 grid of 28-px cells (28 px = one merged vision token of Qwen2-VL, so each
object lands in exactly one token and a tiny model can learn the task). 1-5 objects, each centred in its own
cell; shape circle/square/triangle, colour red/green/blue/yellow (pure RGB, drawn without anti-aliasing),
size small (12 px) or large (22 px). The scene graph is kept in meta["scene"] (the format rewards.ToySceneScorer
reads); boxes are the drawn shape's tight pixel box, normalised to 0..1 and rounded to 2 decimals.

Questions (balanced over the five types, record i gets type TYPES[i % 5]):
  digit  counting ("How many red shapes are there?"); the count is drawn flat over 0..4 first     gt "2"
  mcq    colour / quadrant / relation of a uniquely described object, 4 lettered options in the question, gt "B"
  math   fractions (scenes of 2+ shapes) and sums/differences of counts       gt "\\frac{2}{5}", "3", "-1"
  iou    "Give the bounding box of the blue circle."                          gt "[0.25, 0.50, 0.43, 0.68]"
  open   "Describe the image."   gt deliberately minimal: "There are 3 shapes."  The clean "answer" gives the
         full description (counts per colour-shape group, colour, shape and size: S(pred) - S(gt) >= 4 claims
         under rewards.ToySceneScorer), the direct answer only the colour-shape groups.

Three targets per record, one for each training stage we imitate:
  meta["direct_answer"]  a one-sentence thought and the answer: trains the toy "instruct" base model.
  "answer"               a clean reasoning trace built from the scene: lists every object (row, column,
                         size, colour, shape), reasons step by step, answers. Contains no "aha" word, so the
                         paper's pipeline (step 6) would put it in the SFT split.
  meta["pseudo_answer"]  imitates the distilled "pseudo reasoning" the paper blames for SFT hurting RL: a
                         hesitant opener and filler, the same correct steps, then a detour ("Wait, let me
                         double-check ... hmm"). With probability pseudo_flip_rate (default 0.3) the detour
                         revises the correct step into a near-miss wrong final answer (count +-1, another option,
                         the box one cell over, a wrong total); otherwise the trace ends right after the detour
                         with the correct answer. meta["pseudo_flipped"] records which.
Why this reproduces SFT-then-RL < RL in miniature: the flip is a coin independent of the image and question, and
the text before the branch is drawn the same way for flipped and kept traces, so SFT can only learn "after the
detour, sometimes change your answer to a plausible wrong one" -- imitated self-correction that lowers accuracy.
The pseudo traces are also ~1.6x as long as the clean ones (~155 vs ~100 tokens with a 1024-token BPE; direct
answers ~23), so under RL's token budget more of them are cut and the answer tokens get a thinner share of the
per-token credit. GRPO from the direct-answer base never sees that habit.

Files written by build_world(out_dir): images/<split>_<index>.png and, in the VLAA-Thinking JSON format,
base.json (direct answers as "answer"), sft.json (clean traces), sft_pseudo.json (the same records with the
pseudo traces as "answer"; base.json and sft_pseudo.json keep the clean trace in meta["clean_answer"]),
rl.json, test.json, plus world.json (sizes, seeds, flip rate, version; written last, so its presence means the
world is complete; images an earlier, larger world left in the folder stay, unused).
Splits use distinct seeds and no (scene, question) pair repeats across (or within) splits; build_world checks
this before writing.

    python toyworld.py --out toy [--seed 0] [--pseudo-flip-rate 0.3] [--base-size 4000 ...]
The default world (8,500 records) builds in ~15-20 s on 2 CPU cores.
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from vlaa_min.cli import parse_config, print_config

VERSION = 1
IMAGE_SIZE = 112
GRID = 4
CELL = IMAGE_SIZE // GRID  # 28 px: one 2x2 merge block of 14-px patches
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SIZES = {"small": 12, "large": 22}
TYPES = ("digit", "mcq", "math", "iou", "open")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("to the left", "to the right", "above", "below")
LETTERS = "ABCD"
SPLITS = ("base", "sft", "rl", "test")
DEFAULT_SIZES = {"base": 4000, "sft": 2000, "rl": 2000, "test": 500}
ANSWER_FORMAT = "<think>{think}</think> <answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------------------------------
# Scenes and pixels


@dataclass(frozen=True)
class ToyObject:
    row: int  # 0-based grid row (top to bottom)
    col: int  # 0-based grid column (left to right)
    shape: str
    color: str
    size: str

    @property
    def name(self) -> str:  # "large red circle"
        return f"{self.size} {self.color} {self.shape}"

    @property
    def place(self) -> str:  # 1-based, as a person reads the grid
        return f"row {self.row + 1}, column {self.col + 1}"


def _shape_mask(shape: str, size: str) -> Image.Image:
    """A 28x28 mask (255 = shape) of one shape centred in one cell; drawn without anti-aliasing."""
    extent = SIZES[size]
    lo, hi = (CELL - extent) // 2, (CELL - extent) // 2 + extent - 1  # inclusive pixel range
    mask = Image.new("L", (CELL, CELL), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=255)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=255)
    else:  # an upright isosceles triangle
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) / 2, lo)], fill=255)
    return mask


MASKS = {(shape, size): _shape_mask(shape, size) for shape in SHAPES for size in SIZES}


def object_box(shape: str, size: str, row: int, col: int) -> list[float]:
    """The drawn shape's tight box [x1, y1, x2, y2] (x2, y2 = one past the last pixel), normalised, 2 decimals."""
    left, top, right, bottom = MASKS[(shape, size)].getbbox()
    x0, y0 = col * CELL, row * CELL
    return [round(v / IMAGE_SIZE, 2) for v in (x0 + left, y0 + top, x0 + right, y0 + bottom)]


def format_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def render_scene(objects: list[ToyObject]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    for obj in objects:
        image.paste(COLORS[obj.color], (obj.col * CELL, obj.row * CELL), MASKS[(obj.shape, obj.size)])
    return image


def sample_scene(rng: random.Random) -> list[ToyObject]:
    """1-5 objects in distinct cells, in reading order (row-major)."""
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, 5)))
    return [
        ToyObject(cell // GRID, cell % GRID, rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)))
        for cell in cells
    ]


def scene_graph(objects: list[ToyObject]) -> dict:
    """meta["scene"] in the format rewards.ToySceneScorer reads."""
    return {
        "size": [IMAGE_SIZE, IMAGE_SIZE],
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "box": object_box(o.shape, o.size, o.row, o.col)}
            for o in objects
        ],
    }


def scene_key(objects: list[ToyObject]) -> str:
    return ";".join(f"{o.row}{o.col}:{o.name}" for o in objects)


# ----------------------------------------------------------------------------------------------------------------
# Text helpers


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def there_are(count: int, noun: str) -> str:
    return f"There {'is' if count == 1 else 'are'} {plural(count, noun)}"


def join_words(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def latex_fraction(numerator: int, denominator: int) -> str:
    divisor = math.gcd(numerator, denominator)
    num, den = numerator // divisor, denominator // divisor
    return str(num) if den == 1 else f"\\frac{{{num}}}{{{den}}}"


def listing(objects: list[ToyObject]) -> str:
    """The grounded first step of every clean trace: each object with its place."""
    items = " ".join(f"In {o.place} there is a {o.name}." for o in objects)
    return f"{there_are(len(objects), 'shape')}. {items}"


def the_list(objects: list[ToyObject]) -> str:
    return join_words([f"the {o.name}" for o in objects])


def description(objects: list[ToyObject]) -> tuple[str, str]:
    """(summary, full description): the summary counts each colour-shape group; the full description adds the
    counts per colour, per shape and per size -- more true claims, so it scores higher under the toy open scorer."""
    def counted(key) -> str:
        counts: dict[str, int] = {}
        for o in objects:
            counts[key(o)] = counts.get(key(o), 0) + 1
        return join_words([plural(n, noun) for noun, n in counts.items()])

    summary = f"{there_are(len(objects), 'shape')}: {counted(lambda o: f'{o.color} {o.shape}')}."
    by_color, by_shape = counted(lambda o: f"{o.color} shape"), counted(lambda o: o.shape)
    by_size = counted(lambda o: f"{o.size} shape")
    return summary, f"{summary} In total: {by_color}; {by_shape}; {by_size}."


# ----------------------------------------------------------------------------------------------------------------
# Questions. Each builder returns None when the scene cannot support it, else a dict with the question, gt, the
# clean reasoning steps, the direct thought, and a near-miss wrong (claim, answer) for the pseudo trace's flip.


def unique_description(obj: ToyObject, objects: list[ToyObject], with_color: bool = True) -> str | None:
    """The shortest description that picks out obj alone ("circle", "red circle", "small red circle")."""
    candidates = [(lambda o: o.shape), (lambda o: f"{o.size} {o.shape}")]
    if with_color:
        candidates = [(lambda o: o.shape), (lambda o: f"{o.color} {o.shape}"), (lambda o: o.name)]
    for describe in candidates:
        if sum(describe(o) == describe(obj) for o in objects) == 1:
            return describe(obj)
    return None


def count_question(objects, rng):
    kind = rng.choice(["all", "color", "shape", "size", "color_shape"])
    if kind == "all":
        noun, matches = "shape", lambda o: True
    elif kind == "color":
        # Mostly colours that are present, so that the counts are not dominated by 0.
        color = rng.choice(sorted({o.color for o in objects})) if rng.random() < 0.8 else rng.choice(list(COLORS))
        noun, matches = f"{color} shape", lambda o: o.color == color
    elif kind == "shape":
        shape = rng.choice(SHAPES)
        noun, matches = shape, lambda o: o.shape == shape
    elif kind == "size":
        size = rng.choice(list(SIZES))
        noun, matches = f"{size} shape", lambda o: o.size == size
    else:
        target = rng.choice(objects)
        noun, matches = f"{target.color} {target.shape}", lambda o: (o.color, o.shape) == (target.color, target.shape)
    chosen = [o for o in objects if matches(o)]
    count = len(chosen)
    found = f"{there_are(count, noun)}: {the_list(chosen)}." if chosen else f"There are no {noun}s."
    wrong = count + 1 if count == 0 or rng.random() < 0.5 else count - 1
    return {
        "template": f"count_{kind}", "question": f"How many {noun}s are there?", "gt": str(count),
        "steps": [found, f"That makes {count}."], "direct": f"I see {plural(count, noun)}.",
        "claim": f"there {'is' if count == 1 else 'are'} {plural(count, noun)}",
        "wrong_claim": f"there {'is' if wrong == 1 else 'are'} {plural(wrong, noun)}", "wrong": str(wrong),
    }


def options_text(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))


def mcq_from(question, options, correct, rng, step, direct):
    """Shuffle the 4 options, return the record fields with the correct and one wrong letter."""
    rng.shuffle(options)
    letter = LETTERS[options.index(correct)]
    wrong_option = rng.choice([o for o in options if o != correct])
    wrong_letter = LETTERS[options.index(wrong_option)]
    return {
        "question": f"{question}\n{options_text(options)}", "gt": letter,
        "steps": [step(correct), f"That is option {letter}."], "direct": direct,
        "claim": f"it is {correct}, option {letter}", "wrong_claim": f"it is {wrong_option}, option {wrong_letter}",
        "wrong": wrong_letter,
    }


def mcq_question(objects, rng):
    kinds = ["color", "quadrant", "relation"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "color":
            targets = [(o, d) for o in objects if (d := unique_description(o, objects, with_color=False))]
            if targets:
                obj, desc = rng.choice(targets)
                fields = mcq_from(
                    f"What color is the {desc}?", list(COLORS), obj.color, rng,
                    lambda answer: f"The {desc} is in {obj.place}; it is {answer}.", f"The {desc} is {obj.color}.",
                )
                return {"template": "mcq_color", **fields}
        elif kind == "quadrant":
            obj = rng.choice(objects)
            desc = unique_description(obj, objects)
            if desc:
                quadrant = QUADRANTS[2 * (obj.row >= GRID // 2) + (obj.col >= GRID // 2)]
                fields = mcq_from(
                    f"Where is the {desc} in the image?", list(QUADRANTS), quadrant, rng,
                    lambda answer: f"The {desc} is in {obj.place}, which is the {answer} part.",
                    f"The {desc} is in the {quadrant} part.",
                )
                return {"template": "mcq_quadrant", **fields}
        else:
            pairs = [
                (a, b) for a in objects for b in objects
                if a != b and (a.row == b.row or a.col == b.col)
                and unique_description(a, objects) and unique_description(b, objects)
            ]
            if pairs:
                a, b = rng.choice(pairs)
                da, db = unique_description(a, objects), unique_description(b, objects)
                if a.row == b.row:
                    relation = RELATIONS[0] if a.col < b.col else RELATIONS[1]
                else:
                    relation = RELATIONS[2] if a.row < b.row else RELATIONS[3]
                fields = mcq_from(
                    f"Where is the {da} relative to the {db}?", list(RELATIONS), relation, rng,
                    lambda answer: f"The {da} is in {a.place} and the {db} is in {b.place}, so it is {answer}.",
                    f"The {da} is {relation} of the {db}." if relation.startswith("to") else
                    f"The {da} is {relation} the {db}.",
                )
                return {"template": "mcq_relation", **fields}
    return None


def math_question(objects, rng):
    kind = rng.choice(["fraction_color", "fraction_shape", "sum", "difference"])
    total = len(objects)
    if kind.startswith("fraction"):
        if total == 1:  # "what fraction of the 1 shape" is always 1
            return None
        # Ask about an attribute that only part of the shapes have when there is one (else every answer is "1").
        attribute = (lambda o: o.color) if kind == "fraction_color" else (lambda o: o.shape)
        values = sorted({attribute(o) for o in objects})
        value = rng.choice([v for v in values if len(values) > 1] or values)
        chosen = [o for o in objects if attribute(o) == value]
        noun, asked = (f"{value} shape", value) if kind == "fraction_color" else (value, f"{value}s")
        count = len(chosen)
        wrong_count = count - 1 if count == total or (count > 1 and rng.random() < 0.5) else count + 1
        answer, wrong = latex_fraction(count, total), latex_fraction(wrong_count, total)
        return {
            "template": f"math_{kind}", "question": f"What fraction of the shapes are {asked}?", "gt": answer,
            "steps": [
                f"{there_are(count, noun)}: {the_list(chosen)}.",
                f"The fraction is {count} out of {total}, which is {answer}.",
            ],
            "direct": f"{count} of the {total} shapes are {asked}.",
            "claim": f"{count} of the {total} shapes are {asked}, so the fraction is {answer}",
            "wrong_claim": f"{wrong_count} of the {total} shapes are {asked}, so the fraction is {wrong}",
            "wrong": wrong,
        }
    first, second = rng.sample(list(COLORS), 2)
    a = sum(o.color == first for o in objects)
    b = sum(o.color == second for o in objects)
    word, value = ("plus", a + b) if kind == "sum" else ("minus", a - b)
    wrong = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
    return {
        "template": f"math_{kind}",
        "question": f"What is the number of {first} shapes {word} the number of {second} shapes?", "gt": str(value),
        "steps": [
            f"{there_are(a, first + ' shape')} and {plural(b, second + ' shape')}.",
            f"So the result is {a} {word} {b}, which is {value}.",
        ],
        "direct": f"{a} {word} {b} is {value}.",
        "claim": f"{a} {word} {b} is {value}", "wrong_claim": f"the result is {wrong}", "wrong": str(wrong),
    }


def iou_question(objects, rng):
    targets = [(o, d) for o in objects if (d := unique_description(o, objects))]
    if not targets:
        return None
    obj, desc = rng.choice(targets)
    box = format_box(object_box(obj.shape, obj.size, obj.row, obj.col))
    # The flip's near miss: the same shape one cell over (never overlaps the true box: shapes are < 28 px).
    neighbours = [(r, c) for r, c in ((obj.row, obj.col - 1), (obj.row, obj.col + 1), (obj.row - 1, obj.col),
                                      (obj.row + 1, obj.col)) if 0 <= r < GRID and 0 <= c < GRID]
    row, col = rng.choice(neighbours)
    wrong = format_box(object_box(obj.shape, obj.size, row, col))
    return {
        "template": "iou_box", "question": f"Give the bounding box of the {desc}.", "gt": box,
        "steps": [f"The {desc} is in {obj.place}." if desc == obj.name else
                  f"The {desc} is the {obj.name} in {obj.place}.", f"Its box is {box}."],
        "direct": f"The {desc} is in {obj.place}.",
        "claim": f"the {desc} is in {obj.place}, so its box is {box}",
        "wrong_claim": f"the {desc} is in row {row + 1}, column {col + 1}, so its box is {wrong}", "wrong": wrong,
    }


def open_question(objects, rng):
    total = len(objects)
    summary, full = description(objects)
    wrong_total = total + 1 if total == 1 or rng.random() < 0.5 else total - 1
    wrong = full.replace(there_are(total, "shape"), there_are(wrong_total, "shape"), 1)
    return {
        "template": "open_describe", "question": "Describe the image.", "gt": f"{there_are(total, 'shape')}.",
        # Unlike the other types, the taught answers are not the (minimal) gt: the clean trace answers with the
        # full description, the direct answer with the summary.
        "answer": full, "direct_answer": summary,
        "steps": ["Now I put the counts together."], "direct": f"I see {plural(total, 'shape')}.",
        "claim": f"there {'is' if total == 1 else 'are'} {plural(total, 'shape')} in total",
        "wrong_claim": f"there {'is' if wrong_total == 1 else 'are'} {plural(wrong_total, 'shape')} in total",
        "wrong": wrong,
    }


BUILDERS = {"digit": count_question, "mcq": mcq_question, "math": math_question, "iou": iou_question,
            "open": open_question}


# ----------------------------------------------------------------------------------------------------------------
# The three targets

OPENERS = ("Okay, let me think about this.", "Hmm, let me see.", "Alright, let me work through this.")
FILLERS = (
    "Let me make sure I understand the question.", "I should confirm what the question is asking.",
    "Alternatively, I could go through the shapes one by one.", "Let me look at the image carefully.",
    "This needs some care, so let me check each part.",
)
DETOURS = ("Wait, let me double-check that.", "Hmm, wait. Let me check again.", "Wait, I should confirm this.")
CONFIRMS = ("Yes, {claim}.", "Looking again, {claim}. That seems right.")
REVISIONS = ("Hmm, actually I think I made a mistake: {wrong_claim}.", "Wait, that was a mistake: {wrong_claim}.")


def make_targets(objects: list[ToyObject], spec: dict, flip: bool, rng: random.Random) -> tuple[str, str, str]:
    """(direct answer, clean trace, pseudo trace) for one question."""
    final = spec.get("answer", spec["gt"])  # only open teaches an answer other than its gt
    clean = ANSWER_FORMAT.format(think=" ".join([listing(objects), *spec["steps"]]), answer=final)
    direct = ANSWER_FORMAT.format(think=spec["direct"], answer=spec.get("direct_answer", spec["gt"]))
    hesitation = [rng.choice(OPENERS), *rng.sample(FILLERS, 2)]
    detour = [rng.choice(DETOURS)]
    if flip:
        ending, pseudo_final = rng.choice(REVISIONS).format(wrong_claim=spec["wrong_claim"]), spec["wrong"]
    else:
        ending, pseudo_final = rng.choice(CONFIRMS).format(claim=spec["claim"]), final
    pseudo = ANSWER_FORMAT.format(
        think=" ".join([*hesitation, listing(objects), *spec["steps"], *detour, ending]), answer=pseudo_final
    )
    return direct, clean, pseudo


# ----------------------------------------------------------------------------------------------------------------
# Splits and the world


def generate_split(
    n: int, seed: int, image_dir: str, prefix: str, *, pseudo_flip_rate: float = 0.3, exclude: set | None = None
) -> list[dict]:
    """n records (types balanced: record i is TYPES[i % 5]); writes image_dir/<prefix>_<i>.png.

    exclude: (scene, question) keys already used elsewhere; this split avoids them and adds its own.
    """
    if not 0.0 <= pseudo_flip_rate <= 1.0:
        raise ValueError(f"pseudo_flip_rate must be in [0, 1], got {pseudo_flip_rate}")
    os.makedirs(image_dir, exist_ok=True)
    used = exclude if exclude is not None else set()
    rng = random.Random(seed)
    records = []
    for index in range(n):
        kind = TYPES[index % len(TYPES)]
        # Counts are drawn flat over 0..4 first, so that guessing the commonest count earns only ~20%.
        target_count = str(rng.randrange(5)) if kind == "digit" else None
        while True:  # resample until the scene supports the question (and count) and the pair is new
            objects = sample_scene(rng)
            spec = BUILDERS[kind](objects, rng)
            if spec is None or target_count not in (None, spec["gt"]):
                continue
            if (scene_key(objects), spec["question"]) not in used:
                break
        used.add((scene_key(objects), spec["question"]))
        flip = rng.random() < pseudo_flip_rate
        direct, clean, pseudo = make_targets(objects, spec, flip, rng)
        name = f"{prefix}_{index:06d}"
        render_scene(objects).save(os.path.join(image_dir, name + ".png"))
        records.append({
            "id": name, "image": name + ".png", "question": spec["question"], "gt": spec["gt"],
            "verifier_type": kind, "answer": clean, "caption": description(objects)[1],
            "meta": {
                "source": "toyworld", "template": spec["template"], "scene": scene_graph(objects),
                "scene_key": scene_key(objects), "direct_answer": direct, "pseudo_answer": pseudo,
                "pseudo_flipped": flip,
            },
        })
    return records


def check_disjoint(splits: dict[str, list[dict]]) -> None:
    """Raise if any (scene, question) pair occurs twice, within or across splits."""
    seen: dict[tuple[str, str], str] = {}
    for split, records in splits.items():
        for record in records:
            key = (record["meta"]["scene_key"], record["question"])
            if key in seen:
                raise ValueError(f"toy world: record {record['id']} ({split}) repeats a record of {seen[key]}")
            seen[key] = f"{split}"


def _write_json(path: str, records) -> None:
    """Write to a temporary name and rename, so a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def split_seed(seed: int, split: str) -> int:
    return seed * 10 + SPLITS.index(split) + 1  # distinct for every (seed >= 0, split)


def build_world(out_dir: str, sizes: dict | None = None, seed: int = 0, *, pseudo_flip_rate: float = 0.3) -> dict:
    """Write the toy world under out_dir (see the module docstring); returns the manifest."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"build_world: unknown split(s) {sorted(unknown)}; known: {SPLITS}")
    image_dir = os.path.join(out_dir, "images")
    manifest_path = os.path.join(out_dir, "world.json")
    if os.path.exists(manifest_path):  # a crash below must not leave an old manifest vouching for new files
        os.remove(manifest_path)
    used: set = set()
    splits = {
        split: generate_split(sizes[split], split_seed(seed, split), image_dir, split,
                              pseudo_flip_rate=pseudo_flip_rate, exclude=used)
        for split in SPLITS
    }
    check_disjoint(splits)

    def with_answer(records, target):  # the clean trace moves to meta["clean_answer"], so no target is lost
        return [{**r, "answer": r["meta"][target], "meta": {**r["meta"], "clean_answer": r["answer"]}}
                for r in records]

    files = {
        "base.json": with_answer(splits["base"], "direct_answer"),
        "sft.json": splits["sft"],
        "sft_pseudo.json": with_answer(splits["sft"], "pseudo_answer"),
        "rl.json": splits["rl"],
        "test.json": splits["test"],
    }
    for name, records in files.items():
        _write_json(os.path.join(out_dir, name), records)
    manifest = {
        "version": VERSION, "seed": seed, "sizes": sizes,
        "split_seeds": {split: split_seed(seed, split) for split in SPLITS},
        "pseudo_flip_rate": pseudo_flip_rate, "image_size": IMAGE_SIZE, "images_root": "images",
        "files": {name: len(records) for name, records in files.items()},
    }
    _write_json(manifest_path, manifest)
    return manifest


@dataclass
class WorldConfig:
    out: str = field(default="toy", metadata={"help": "output folder (images/ and the JSON files go here)"})
    seed: int = field(default=0, metadata={"help": "world seed; each split derives its own seed from it"})
    pseudo_flip_rate: float = field(default=0.3,
                                    metadata={"help": "share of pseudo traces that flip to a wrong answer"})
    base_size: int = field(default=DEFAULT_SIZES["base"], metadata={"help": "records in base.json"})
    sft_size: int = field(default=DEFAULT_SIZES["sft"], metadata={"help": "records in sft.json / sft_pseudo.json"})
    rl_size: int = field(default=DEFAULT_SIZES["rl"], metadata={"help": "records in rl.json"})
    test_size: int = field(default=DEFAULT_SIZES["test"], metadata={"help": "records in test.json"})


if __name__ == "__main__":
    config = parse_config(WorldConfig, description="Build the offline toy world (images + VLAA-Thinking JSON).")
    print_config(config)
    start = time.perf_counter()
    manifest = build_world(
        config.out, {split: getattr(config, f"{split}_size") for split in SPLITS}, config.seed,
        pseudo_flip_rate=config.pseudo_flip_rate,
    )
    for name, count in manifest["files"].items():
        print(f"wrote {os.path.join(config.out, name)}: {count} records")
    print(f"images in {os.path.join(config.out, 'images')}; manifest {os.path.join(config.out, 'world.json')}")
    print(f"built in {time.perf_counter() - start:.1f} s")
