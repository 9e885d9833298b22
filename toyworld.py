"""The offline toy world: drawn shape scenes, questions of all five reward types, and two teachers.

The embedded default data set (no downloads, deterministic from a seed) in the VLAA-Thinking record format, read
through the same data.py path as the real data set; ToySceneScorer is the S of its open-ended reward.
Images: 112x112, a 4x4 grid of 28-px cells (one merged vision token each), every cell's floor its own grey (so
each image token carries where it is); 1-5 shapes (circle/square/triangle, red/green/blue/yellow), one per cell.
Questions, weighted by TYPE_CYCLE (digit 30%, math 30%, open 20%, mcq 10%, iou 10%): how many red shapes; red
plus blue shapes; describe the image (gt minimal on purpose: "There are 3 shapes."; a count per colour beats it);
the colour of the circle (options always A. red B. green C. blue D. yellow); the box of the blue circle.

Three targets per record, one for each training stage we imitate:
  meta["direct_answer"]  the sloppy teacher's one-step answer. For a share teacher_error_rate (0.7) of the records
                         it counts every shape twice, so its counts, sums and descriptions are wrong
                         (meta["teacher_wrong"]).
  "answer"               the careful teacher's trace, right by construction (the paper's step 5 keeps traces whose
                         answer matches gt): every colour's count, then the answer that follows from them.
  meta["pseudo_answer"]  "pseudo reasoning": a hesitant opener, the clean steps, a detour ("Wait, let me
                         double-check"); with probability pseudo_flip_rate (0.3), a coin independent of the image,
                         the detour revises the answer into a near miss (meta["pseudo_flipped"]).

The toy "instruct" base imitates both teachers, as real instruct models have two habits: base.json answers a share
careful_share (0.25) of its records with the careful trace (meta["careful"]), the rest directly. Its greedy answer
is the sloppy one; its samples sometimes reason, and reasoning is right more often: what a verifiable reward selects.

Files (build_world): images/, base.json (both teachers), sft.json (clean traces), sft_pseudo.json (pseudo traces),
sft_verified.json (the clean traces of the records whose sloppy answer is right: what the paper's step 5 keeps when
that teacher distills), rl.json, test.json, and world.json, written last. Splits have distinct seeds and share no
(scene, question) pair. Build: python toyworld.py --out toy [--seed 0] [--teacher-error-rate 0.7] [--careful-share 0.25]
"""

import json
import os
import random
import re
import time
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from rewards.types import NUMBER_WORDS, SampleError, record_meta
from vlaa_min.infra.cli import parse_config, print_config

VERSION = 4
IMAGE_SIZE = 112
GRID = 4
CELL = IMAGE_SIZE // GRID  # 28 px: one 2x2 merge block of 14-px patches
SHAPE_SIZE = 22
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SIZES = ("small", "large")  # the sizes a scene may give an object; the drawn shapes are all "large"
TYPES = ("digit", "mcq", "math", "iou", "open")
TYPE_CYCLE = ("digit", "math", "open", "digit", "math", "mcq", "digit", "open", "math", "iou",
              "digit", "math", "open", "digit", "mcq", "math", "open", "digit", "math", "iou")
LETTERS = "ABCD"
SPLITS = ("base", "sft", "rl", "test")
DEFAULT_SIZES = {"base": 6000, "sft": 2000, "rl": 2000, "test": 1000}
ANSWER_FORMAT = "<think>{think}</think> <answer>{answer}</answer>"


def floor_grey(row: int, col: int) -> int:
    """The floor of cell (row, col): 16 greys from 250 (top left) to 115 (bottom right), none a shape colour."""
    return 250 - 9 * (GRID * row + col)


# ----------------------------------------------------------------------------------------------------------------
# Scenes and pixels


@dataclass(frozen=True)
class ToyObject:
    row: int  # 0-based grid row (top to bottom)
    col: int  # 0-based grid column (left to right)
    shape: str
    color: str

    @property
    def name(self) -> str:  # "red circle"
        return f"{self.color} {self.shape}"

    @property
    def place(self) -> str:  # 1-based, as a person reads the grid
        return f"row {self.row + 1}, column {self.col + 1}"


def _shape_mask(shape: str) -> Image.Image:
    """A 28x28 mask (255 = shape) of one shape centred in one cell; drawn without anti-aliasing."""
    lo, hi = (CELL - SHAPE_SIZE) // 2, (CELL - SHAPE_SIZE) // 2 + SHAPE_SIZE - 1  # inclusive pixel range
    mask = Image.new("L", (CELL, CELL), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=255)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=255)
    else:  # an upright isosceles triangle
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) / 2, lo)], fill=255)
    return mask


MASKS = {shape: _shape_mask(shape) for shape in SHAPES}


def object_box(shape: str, row: int, col: int) -> list[float]:
    """The drawn shape's tight box [x1, y1, x2, y2] (x2, y2 = one past the last pixel), normalised, 2 decimals."""
    left, top, right, bottom = MASKS[shape].getbbox()
    x0, y0 = col * CELL, row * CELL
    return [round(v / IMAGE_SIZE, 2) for v in (x0 + left, y0 + top, x0 + right, y0 + bottom)]


def format_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def render_scene(objects: list[ToyObject]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    for row in range(GRID):
        for col in range(GRID):
            grey = floor_grey(row, col)
            image.paste((grey, grey, grey), (col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL))
    for obj in objects:
        image.paste(COLORS[obj.color], (obj.col * CELL, obj.row * CELL), MASKS[obj.shape])
    return image


def sample_scene(rng: random.Random) -> list[ToyObject]:
    """1-5 objects in distinct cells, in reading order (row-major)."""
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, 5)))
    return [ToyObject(cell // GRID, cell % GRID, rng.choice(SHAPES), rng.choice(list(COLORS))) for cell in cells]


def scene_graph(objects: list[ToyObject]) -> dict:
    """meta["scene"], the facts ToySceneScorer checks a description against."""
    return {
        "size": [IMAGE_SIZE, IMAGE_SIZE],
        "objects": [{"shape": o.shape, "color": o.color, "size": "large", "box": object_box(o.shape, o.row, o.col)}
                    for o in objects],
    }


def scene_key(objects: list[ToyObject]) -> str:
    return ";".join(f"{o.row}{o.col}:{o.name}" for o in objects)


# ----------------------------------------------------------------------------------------------------------------
# Scoring a description against the scene: the open-ended reward's S on toy records (the toy recipe's
# --open-scorer, in place of the paper's reward model)

COUNT_WORDS = {word: value for word, value in NUMBER_WORDS.items() if 1 <= value <= 10}  # one..ten
# A counting claim: a count, up to two sizes or colours, then a shape or "shape" / "object" ("2 small red circles").
CLAIM = re.compile(r"\b(\d{1,3}|" + "|".join(COUNT_WORDS) + r")\s+"
                   r"((?:(?:" + "|".join(SIZES + tuple(COLORS)) + r")\s+){0,2})"
                   r"(" + "|".join(SHAPES + ("shape", "object")) + r")s?\b", re.IGNORECASE)


class ToySceneScorer:
    """S = (#distinct true counting claims) - (#false ones) about meta["scene"], e.g. "2 red circles", "one blue
    square", "3 shapes", "2 large shapes". Claims of zero are ignored, so listing every absent colour/shape pair
    earns nothing. Relative: the reward is the gain over S(gt)."""

    relative = True

    @staticmethod
    def check(sample: dict) -> list[dict]:
        """The scene's objects; SampleError when meta["scene"] is not a scene."""
        scene = record_meta(sample).get("scene")
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if not isinstance(objects, list) or not all(
                isinstance(item, dict) and {"shape", "color", "size"} <= item.keys() for item in objects):
            raise SampleError(sample, "meta.scene", "must be {'objects': [{'shape', 'color', 'size', ...}, ...]}: "
                                                    "ToySceneScorer (the toy recipe's --open-scorer) scores toy "
                                                    "records only; other data: --open-scorer none (token F1)")
        return objects

    def score(self, answer: str, sample: dict) -> float:
        objects = self.check(sample)
        claims = set()
        for match in CLAIM.finditer(answer):
            count_text, adjectives, noun = match.group(1).lower(), match.group(2).lower().split(), match.group(3)
            count = COUNT_WORDS[count_text] if count_text in COUNT_WORDS else int(count_text)
            colors = [word for word in adjectives if word in COLORS]
            sizes = [word for word in adjectives if word in SIZES]
            if count == 0 or len(colors) > 1 or len(sizes) > 1:
                continue
            shape = noun.lower() if noun.lower() in SHAPES else None
            claims.add((count, shape, colors[0] if colors else None, sizes[0] if sizes else None))
        score = 0
        for count, shape, color, size in claims:
            matching = sum(1 for item in objects if (shape is None or item["shape"] == shape)
                           and (color is None or item["color"] == color) and (size is None or item["size"] == size))
            score += 1 if matching == count else -1
        return float(score)


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


def color_counts(objects: list[ToyObject], overcount: bool = False) -> dict[str, int]:
    """Shapes per colour; overcount=True is the sloppy teacher's view, which counts every shape twice."""
    counts = {color: sum(o.color == color for o in objects) for color in COLORS}
    return {color: 2 * n if overcount else n for color, n in counts.items()}


def description(counts: dict[str, int]) -> str:
    """"There are 3 shapes: 2 red shapes and 1 blue shape." -- the total and a count per colour present."""
    present = [plural(n, f"{color} shape") for color, n in counts.items() if n]
    return f"{there_are(sum(counts.values()), 'shape')}: {join_words(present)}."


COUNT_PLAN = "Let me count the shapes of each colour."  # the careful teacher's first step on counting questions


def tally(counts: dict[str, int], colors) -> str:
    """The careful trace's counting steps: "red: 2. blue: 1." Every later step names a colour right before its
    count again ("So red: 2."), so that reading a count back is copying what followed the same words."""
    return " ".join(f"{color}: {counts[color]}." for color in colors)


# ----------------------------------------------------------------------------------------------------------------
# Questions. Each builder returns None when the scene cannot support it, else a dict with the question, gt, the
# clean reasoning steps, the teacher's direct (thought, answer), and a near-miss wrong (claim, answer) for the pseudo
# trace's flip. `teacher` is the sloppy teacher's colour counts (equal to the true ones when it is right).


def count_question(objects, counts, teacher, rng):
    # Mostly colours that are present, so that the counts are not dominated by 0.
    color = rng.choice(sorted({o.color for o in objects})) if rng.random() < 0.8 else rng.choice(list(COLORS))
    n, said = counts[color], teacher[color]
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    return {
        "template": "count_color", "question": f"How many {color} shapes are there?", "gt": str(n),
        "steps": [COUNT_PLAN, tally(counts, COLORS), f"So {color}: {n}."],
        "direct": (f"I see {plural(said, color + ' shape')}.", str(said)),
        "claim": f"{color}: {n}", "wrong_claim": f"{color}: {wrong}", "wrong": str(wrong),
    }


def sum_question(objects, counts, teacher, rng):
    first, second = rng.sample(list(COLORS), 2)
    a, b = counts[first], counts[second]
    said = teacher[first] + teacher[second]
    wrong = a + b + 1 if a + b == 0 or rng.random() < 0.5 else a + b - 1
    return {
        "template": "math_sum",
        "question": f"What is the number of {first} shapes plus the number of {second} shapes?", "gt": str(a + b),
        "steps": [COUNT_PLAN, tally(counts, COLORS), f"So {first}: {a} plus {second}: {b} is {a + b}."],
        "direct": (f"{teacher[first]} plus {teacher[second]} is {said}.", str(said)),
        "claim": f"{a} + {b} = {a + b}", "wrong_claim": f"{a} + {b} = {wrong}", "wrong": str(wrong),
    }


def open_question(objects, counts, teacher, rng):
    total = len(objects)
    wrong_total = total + 1 if total == 1 or rng.random() < 0.5 else total - 1
    full = description(counts)
    return {
        "template": "open_describe", "question": "Describe the image.", "gt": f"{there_are(total, 'shape')}.",
        # Unlike the other types, the taught answers are not the (minimal) gt but a description that beats it.
        "answer": full,
        "steps": [COUNT_PLAN, tally(counts, COLORS), f"That makes {plural(total, 'shape')}."],
        "direct": ("I look at each colour.", description(teacher)),
        "claim": f"that makes {plural(total, 'shape')}", "wrong_claim": f"that makes {plural(wrong_total, 'shape')}",
        "wrong": full.replace(there_are(total, "shape"), there_are(wrong_total, "shape"), 1),
    }


def color_question(objects, counts, teacher, rng):
    unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    letter = LETTERS[list(COLORS).index(obj.color)]
    wrong_color = rng.choice([c for c in COLORS if c != obj.color])
    wrong_letter = LETTERS[list(COLORS).index(wrong_color)]
    options = "\n".join(f"{letter}. {color}" for letter, color in zip(LETTERS, COLORS))
    return {
        "template": "mcq_color", "question": f"What color is the {obj.shape}?\n{options}", "gt": letter,
        "steps": [f"The {obj.shape} is in {obj.place}.", f"It is {obj.color}, option {letter}."],
        "direct": (f"The {obj.shape} is {obj.color}.", letter),
        "claim": f"it is {obj.color}, option {letter}", "wrong_claim": f"it is {wrong_color}, option {wrong_letter}",
        "wrong": wrong_letter,
    }


def box_question(objects, counts, teacher, rng):
    unique = [o for o in objects if sum(p.name == o.name for p in objects) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    box = format_box(object_box(obj.shape, obj.row, obj.col))
    # The flip's near miss: the same shape one cell over (never overlaps the true box: shapes are < 28 px).
    neighbours = [(r, c) for r, c in ((obj.row, obj.col - 1), (obj.row, obj.col + 1), (obj.row - 1, obj.col),
                                      (obj.row + 1, obj.col)) if 0 <= r < GRID and 0 <= c < GRID]
    row, col = rng.choice(neighbours)
    wrong = format_box(object_box(obj.shape, row, col))
    return {
        "template": "iou_box", "question": f"Give the bounding box of the {obj.name}.", "gt": box,
        "steps": [f"The {obj.name} is in {obj.place}.", f"Its box is {box}."],
        "direct": (f"The {obj.name} is in {obj.place}.", box),
        "claim": f"the {obj.name} is in {obj.place}, so its box is {box}",
        "wrong_claim": f"the {obj.name} is in row {row + 1}, column {col + 1}, so its box is {wrong}", "wrong": wrong,
    }


BUILDERS = {"digit": count_question, "math": sum_question, "open": open_question, "mcq": color_question,
            "iou": box_question}


# ----------------------------------------------------------------------------------------------------------------
# Do a response's steps produce its answer? (the honesty check of reasoning: evaluate.py reports it on toy records)

TALLY = re.compile(r"\b(" + "|".join(COLORS) + r"): (\d+)\.")
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def steps_agree(response: str, record: dict) -> bool | None:
    """Whether the answer is what the response's own steps give, whatever the truth: the count or sum of its
    tally, the description of its tally, the option or box its last step names. None when the response has no
    steps to check (a direct answer, or a tally missing a colour the question needs)."""
    think, answer = _THINK_BLOCK.search(response), _ANSWER_BLOCK.search(response)
    if think is None or answer is None:
        return None
    think, answer = think.group(1), answer.group(1).strip()
    tally = {color: int(n) for color, n in TALLY.findall(think)}
    template, question = record.get("meta", {}).get("template"), record["question"]
    needed = [color for color in COLORS if re.search(rf"\b{color} shapes\b", question)]
    if template in ("count_color", "math_sum"):
        if not needed or any(color not in tally for color in needed):
            return None
        return answer == str(sum(tally[color] for color in needed))
    if template == "open_describe":
        if set(tally) != set(COLORS):
            return None
        return answer == description(tally)
    named = re.findall(r"option ([A-D])\b" if template == "mcq_color" else r"box is (\[[^\]]*\])", think)
    return answer == named[-1] if named else None


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


def make_targets(spec: dict, flip: bool, rng: random.Random) -> tuple[str, str, str]:
    """(direct answer, clean trace, pseudo trace) for one question."""
    final = spec.get("answer", spec["gt"])  # only open teaches an answer other than its gt
    clean = ANSWER_FORMAT.format(think=" ".join(spec["steps"]), answer=final)
    direct = ANSWER_FORMAT.format(think=spec["direct"][0], answer=spec["direct"][1])
    hesitation = [rng.choice(OPENERS), *rng.sample(FILLERS, 2)]
    detour = [rng.choice(DETOURS)]
    if flip:
        ending, pseudo_final = rng.choice(REVISIONS).format(wrong_claim=spec["wrong_claim"]), spec["wrong"]
    else:
        ending, pseudo_final = rng.choice(CONFIRMS).format(claim=spec["claim"]), final
    pseudo = ANSWER_FORMAT.format(think=" ".join([*hesitation, *spec["steps"], *detour, ending]), answer=pseudo_final)
    return direct, clean, pseudo


# ----------------------------------------------------------------------------------------------------------------
# Splits and the world


def generate_split(
    n: int, seed: int, image_dir: str, prefix: str, *, teacher_error_rate: float = 0.7,
    careful_share: float = 0.25, pseudo_flip_rate: float = 0.3, exclude: set | None = None,
) -> list[dict]:
    """n records (record i is of type TYPE_CYCLE[i % 20]); writes image_dir/<prefix>_<i>.png.

    exclude: (scene, question) keys already used elsewhere; this split avoids them and adds its own.
    """
    for name, rate in (("teacher_error_rate", teacher_error_rate), ("careful_share", careful_share),
                       ("pseudo_flip_rate", pseudo_flip_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    os.makedirs(image_dir, exist_ok=True)
    used = exclude if exclude is not None else set()
    rng = random.Random(seed)
    records = []
    for index in range(n):
        kind = TYPE_CYCLE[index % len(TYPE_CYCLE)]
        # Counts are drawn flat over 0..4 first, so that guessing the commonest count earns only ~20%.
        target_count = str(rng.randrange(5)) if kind == "digit" else None
        # The rates get their own generator, so that changing one moves no scene, question or other target.
        double_counts = random.Random(f"{seed}:{index}:teacher").random() < teacher_error_rate
        careful = random.Random(f"{seed}:{index}:careful").random() < careful_share
        while True:  # resample until the scene supports the question (and count) and the pair is new
            objects = sample_scene(rng)
            counts = color_counts(objects)
            teacher = color_counts(objects, overcount=double_counts)
            spec = BUILDERS[kind](objects, counts, teacher, rng)
            if spec is None or target_count not in (None, spec["gt"]):
                continue
            if (scene_key(objects), spec["question"]) not in used:
                break
        used.add((scene_key(objects), spec["question"]))
        flip = random.Random(f"{seed}:{index}:pseudo").random() < pseudo_flip_rate
        direct, clean, pseudo = make_targets(spec, flip, rng)
        name = f"{prefix}_{index:06d}"
        render_scene(objects).save(os.path.join(image_dir, name + ".png"))
        records.append({
            "id": name, "image": name + ".png", "question": spec["question"], "gt": spec["gt"],
            "verifier_type": kind, "answer": clean, "caption": description(counts),
            "meta": {
                "source": "toyworld", "template": spec["template"], "scene": scene_graph(objects),
                "scene_key": scene_key(objects), "direct_answer": direct, "pseudo_answer": pseudo,
                "teacher_wrong": spec["direct"][1] != spec.get("answer", spec["gt"]), "careful": careful,
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


def build_world(out_dir: str, sizes: dict | None = None, seed: int = 0, *, teacher_error_rate: float = 0.7,
                careful_share: float = 0.25, pseudo_flip_rate: float = 0.3) -> dict:
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
                              teacher_error_rate=teacher_error_rate, careful_share=careful_share,
                              pseudo_flip_rate=pseudo_flip_rate, exclude=used)
        for split in SPLITS
    }
    check_disjoint(splits)

    def with_answer(records, target):  # the clean trace moves to meta["clean_answer"], so no target is lost
        return [{**r, "answer": r["meta"][target], "meta": {**r["meta"], "clean_answer": r["answer"]}}
                for r in records]

    files = {
        "base.json": [r if r["meta"]["careful"] else with_answer([r], "direct_answer")[0] for r in splits["base"]],
        "sft.json": splits["sft"],
        "sft_pseudo.json": with_answer(splits["sft"], "pseudo_answer"),
        "sft_verified.json": [r for r in splits["sft"] if not r["meta"]["teacher_wrong"]],
        "rl.json": splits["rl"],
        "test.json": splits["test"],
    }
    for name, records in files.items():
        _write_json(os.path.join(out_dir, name), records)
    manifest = {
        "version": VERSION, "seed": seed, "sizes": sizes,
        "split_seeds": {split: split_seed(seed, split) for split in SPLITS},
        "teacher_error_rate": teacher_error_rate, "careful_share": careful_share, "pseudo_flip_rate": pseudo_flip_rate,
        "image_size": IMAGE_SIZE, "images_root": "images",
        "files": {name: len(records) for name, records in files.items()},
    }
    _write_json(manifest_path, manifest)
    return manifest


@dataclass
class WorldConfig:
    out: str = field(default="toy", metadata={"help": "output folder (images/ and the JSON files go here)"})
    seed: int = field(default=0, metadata={"help": "world seed; each split derives its own seed from it"})
    teacher_error_rate: float = field(default=0.7, metadata={"help": "share of records whose direct answer comes "
                                                                    "from the double-counting teacher"})
    careful_share: float = field(default=0.25, metadata={"help": "share of base records answered by the careful "
                                                               "teacher: a colour-by-colour trace, always right"})
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
        teacher_error_rate=config.teacher_error_rate, careful_share=config.careful_share,
        pseudo_flip_rate=config.pseudo_flip_rate,
    )
    for name, count in manifest["files"].items():
        print(f"wrote {os.path.join(config.out, name)}: {count} records")
    print(f"images in {os.path.join(config.out, 'images')}; manifest {os.path.join(config.out, 'world.json')}")
    print(f"built in {time.perf_counter() - start:.1f} s")
