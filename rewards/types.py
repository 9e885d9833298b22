"""Which of the five rewards scores a record: its "verifier_type" (or an alias), else its source data set.

data.py calls it (through rewards.check_sample) when it loads a file, rewards/ when it scores an answer.
The RL split of VLAA-Thinking has no verifier_type on some records; their source (meta["source"], "source", or
a folder of the image path) names the data set, and each data set has one reward type. SampleError names a
record and the field no answer could be scored against.
"""

import re

REWARD_TYPES = ("digit", "mcq", "math", "iou", "open")

# Number words the digit reward reads (without digits in the answer) and the toy scene scorer counts with.
NUMBER_WORDS = {word: index for index, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}

# Other spellings of verifier_type, after lower-casing and turning "-", "." and spaces into "_".
TYPE_ALIASES = {
    **{name: name for name in REWARD_TYPES},
    "digits": "digit", "number": "digit", "numeric": "digit", "integer": "digit", "count": "digit",
    "counting": "digit",
    "multiple_choice": "mcq", "multi_choice": "mcq", "multichoice": "mcq", "choice": "mcq", "option": "mcq",
    "math_verify": "math", "symbolic": "math", "expression": "math",
    "bbox": "iou", "box": "iou", "grounding": "iou",
    "open_ended": "open", "openended": "open", "free_form": "open", "reward_model": "open", "rm": "open",
}

# Source data set (spelled as above) -> reward type: the paper's table of the RL split.
SOURCE_TO_TYPE = {
    "clevr_math": "digit", "clevrmath": "digit",
    "geoqa170k": "mcq", "geoqa_170k": "mcq", "geoqa": "mcq", "geo170k": "mcq", "arxivqa": "mcq", "arxiv_qa": "mcq",
    "math_puma": "math", "mathpuma": "math",
    "coco": "iou", "vg": "iou", "visual_genome": "iou", "llava_cot": "iou", "llava_cot_coco": "iou",
    "llava_cot_vg": "iou",
    "allava": "open", "allava_4v": "open", "docvqa": "open", "vizwiz": "open",
}


def record_name(record: dict) -> str:
    return f"record {record.get('id', '<no id>')!r}"


def record_meta(record: dict) -> dict:
    """record["meta"], or {} when it is missing or not a dict."""
    meta = record.get("meta")
    return meta if isinstance(meta, dict) else {}


class SampleError(ValueError):
    """A sample no response can be scored against: "record 'id': field 'gt' <problem>"."""

    def __init__(self, sample: dict, field: str, problem: str):
        super().__init__(f"{record_name(sample)}: field '{field}' {problem}")
        self.field, self.problem = field, problem


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s\-.]+", "_", name.strip().lower())


def resolve_type(record: dict) -> str:
    """The record's reward type: its verifier_type (aliases allowed), else looked up from its source data set.

    The source is meta["source"], then record["source"], then the folders of record["image"] (the first one found
    in SOURCE_TO_TYPE, so "clevr_math/x.png" and "/data/images/clevr_math/x.png" both work).
    """
    declared = record.get("verifier_type")
    if declared is not None:
        resolved = TYPE_ALIASES.get(_normalise_name(str(declared)))
        if resolved is None:
            raise ValueError(f"{record_name(record)}: field 'verifier_type' = {declared!r} is not a known reward "
                             f"type; expected one of {REWARD_TYPES} or an alias in reward_types.TYPE_ALIASES")
        return resolved
    candidates = [record_meta(record).get("source"), record.get("source")]
    image = record.get("image")
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, str):
        candidates += re.split(r"[\\/]", image)[:-1]
    for candidate in candidates:
        if isinstance(candidate, str) and _normalise_name(candidate) in SOURCE_TO_TYPE:
            return SOURCE_TO_TYPE[_normalise_name(candidate)]
    raise ValueError(f"{record_name(record)}: no 'verifier_type' and no known source in fields 'meta.source', "
                     f"'source' or 'image' (image={record.get('image')!r}); known sources: {sorted(SOURCE_TO_TYPE)}")
