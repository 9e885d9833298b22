"""The toy world: answers re-derived from the drawn pixels, rewards of the reference answers, the flawed teacher,
the pseudo traces, disjoint splits and determinism."""

import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rewards
import toyworld

SMALL_SIZES = {"base": 40, "sft": 40, "rl": 40, "test": 40}
AHA_WORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")
FILES = ("base.json", "sft.json", "sft_pseudo.json", "sft_verified.json", "rl.json", "test.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    manifest = toyworld.build_world(str(out), SMALL_SIZES, seed=3)
    files = {name: json.loads((out / name).read_text()) for name in FILES}
    return {"out": out, "manifest": manifest, "files": files}


def all_records(world):
    """Every distinct record once (sft_pseudo repeats sft with another answer)."""
    return [r for name in ("base.json", "sft.json", "rl.json", "test.json") for r in world["files"][name]]


def clean_answer(record: dict) -> str:
    """The clean reasoning trace: "answer", except in base.json where "answer" is the direct answer."""
    return record["meta"].get("clean_answer", record["answer"])


# --- reading a scene back from the pixels ---------------------------------------------------------------------

RGB_TO_COLOR = {rgb: name for name, rgb in toyworld.COLORS.items()}
# Fill ratio (area / box area) of the ideal shapes: square 1, circle pi/4, triangle 1/2.
FILL_RATIO = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


def components(pixels: set[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """4-connected components of a set of (y, x) pixels."""
    left, found = set(pixels), []
    while left:
        stack, part = [left.pop()], []
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for neighbour in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if neighbour in left:
                    left.remove(neighbour)
                    stack.append(neighbour)
        found.append(part)
    return found


@functools.cache
def read_scene(path: Path) -> list[dict]:
    """Objects (shape, color, box, row, col) found in the image's pixels alone; also checks every cell's floor."""
    image = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    height, width, _ = image.shape
    floors = {(g, g, g) for g in (toyworld.floor_grey(r, c) for r in range(toyworld.GRID) for c in range(toyworld.GRID))}
    packed = np.unique((image.astype(np.int64) * [1 << 16, 1 << 8, 1]).sum(-1))  # one int per distinct colour
    colours = {(int(v) >> 16, int(v) >> 8 & 255, int(v) & 255) for v in packed}
    assert colours <= floors | set(RGB_TO_COLOR), f"{path}: unexpected colours {colours - floors}"
    for row in range(toyworld.GRID):  # a cell's corner pixel is never covered by its shape
        for col in range(toyworld.GRID):
            grey = toyworld.floor_grey(row, col)
            assert tuple(image[row * toyworld.CELL, col * toyworld.CELL]) == (grey, grey, grey), (path, row, col)
    objects = []
    for rgb, color in RGB_TO_COLOR.items():
        ys, xs = np.nonzero(np.all(image == np.array(rgb), axis=-1))
        for part in components(set(zip(ys.tolist(), xs.tolist()))):
            py, px = zip(*part)
            x1, y1, x2, y2 = min(px), min(py), max(px) + 1, max(py) + 1
            ratio = len(part) / ((x2 - x1) * (y2 - y1))
            objects.append({
                "color": color, "shape": min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - ratio)),
                "box": [x1 / width, y1 / height, x2 / width, y2 / height],
                "row": (y1 + y2) // 2 // toyworld.CELL, "col": (x1 + x2) // 2 // toyworld.CELL,
            })
    return objects


def find_one(description: str, objects: list[dict]) -> dict:
    """The single object matching every word of a description like "red circle"."""
    words = description.split()
    matches = [o for o in objects if all(w in (o["shape"], o["color"]) for w in words)]
    assert len(matches) == 1, f"{description!r} should name exactly one object, names {len(matches)}"
    return matches[0]


def count(objects, **attributes) -> int:
    return sum(all(o[k] == v for k, v in attributes.items()) for o in objects)


def answer_from_pixels(record: dict, objects: list[dict]) -> str:
    """Answer the record's question from the pixel-derived objects, by the question's wording alone."""
    question = record["question"]
    lines = question.split("\n")
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(count(objects, color=m[1]))
    if m := re.fullmatch(r"What color is the (\w+)\?", lines[0]):
        assert lines[1:] == ["A. red", "B. green", "C. blue", "D. yellow"], lines
        return {line[3:]: line[0] for line in lines[1:]}[find_one(m[1], objects)["color"]]
    if m := re.fullmatch(r"What is the number of (\w+) shapes plus the number of (\w+) shapes\?", question):
        return str(count(objects, color=m[1]) + count(objects, color=m[2]))
    if m := re.fullmatch(r"Give the bounding box of the (.+)\.", question):
        return str(find_one(m[1], objects)["box"])
    assert question == "Describe the image.", f"unknown question {question!r}"
    return f"{len(objects)} shapes"


def test_answers_follow_from_the_pixels(world):
    image_dir = world["out"] / "images"
    for record in all_records(world):
        objects = read_scene(image_dir / record["image"])
        expected = answer_from_pixels(record, objects)
        kind, gt = record["verifier_type"], record["gt"]
        if kind == "iou":
            box = [float(v) for v in gt.strip("[]").split(",")]
            # gt is rounded to 2 decimals: each side within half a hundredth of the pixel box.
            assert np.allclose(box, json.loads(expected), atol=0.005 + 1e-9), (record["id"], gt, expected)
        elif kind == "open":
            assert re.fullmatch(r"There (is|are) (\d+) shapes?\.", gt)[2] + " shapes" == expected, record["id"]
        else:
            assert gt == expected, (record["id"], record["question"], gt, expected)


def test_scene_graph_matches_the_pixels(world):
    image_dir = world["out"] / "images"
    for record in all_records(world)[:80]:
        drawn = read_scene(image_dir / record["image"])
        scene = record["meta"]["scene"]
        assert scene["size"] == [toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE]
        assert 1 <= len(scene["objects"]) <= 5
        key = lambda o: (o["box"][1], o["box"][0])  # reading order
        for stated, seen in zip(sorted(scene["objects"], key=key), sorted(drawn, key=key), strict=True):
            assert (stated["shape"], stated["color"]) == (seen["shape"], seen["color"])
            assert np.allclose(stated["box"], seen["box"], atol=0.005 + 1e-9)
        cells = {(o["row"], o["col"]) for o in drawn}
        assert len(cells) == len(drawn), "one object per cell"


def test_types_follow_the_weighted_cycle_and_fields_are_complete(world):
    assert set(toyworld.TYPE_CYCLE) == set(toyworld.TYPES)
    for name, records in world["files"].items():
        if name != "sft_verified.json":  # a filtered subset: its own test checks it
            assert [r["verifier_type"] for r in records] == [toyworld.TYPE_CYCLE[i % 20] for i in range(len(records))]
        for r in records:
            assert {"id", "image", "question", "gt", "verifier_type", "answer", "meta"} <= set(r)
            assert re.fullmatch(r"<think>.+</think> <answer>.+</answer>", r["answer"], re.S), r["answer"]


def test_targets_per_file(world):
    files = world["files"]
    # The base: the careful teacher's clean trace where it answered, else the sloppy teacher's direct answer.
    assert [r["answer"] for r in files["base.json"]] == [
        clean_answer(r) if r["meta"]["careful"] else r["meta"]["direct_answer"] for r in files["base.json"]]
    assert all("clean_answer" not in r["meta"] for r in files["base.json"] if r["meta"]["careful"])
    assert [r["answer"] for r in files["sft_pseudo.json"]] == [r["meta"]["pseudo_answer"] for r in files["sft.json"]]
    assert [r["meta"]["clean_answer"] for r in files["sft_pseudo.json"]] == [r["answer"] for r in files["sft.json"]]
    assert all("clean_answer" not in r["meta"] for name in ("sft.json", "rl.json", "test.json") for r in files[name])
    assert [r["id"] for r in files["sft_pseudo.json"]] == [r["id"] for r in files["sft.json"]]
    # Verified: the records whose teacher answer passes the ground-truth check, with their clean traces.
    verified = [r for r in files["sft.json"] if not r["meta"]["teacher_wrong"]]
    assert files["sft_verified.json"] == verified and 0 < len(verified) < len(files["sft.json"])
    for r in verified:
        if r["verifier_type"] in ("digit", "math", "mcq"):
            assert r["meta"]["direct_answer"].endswith(f"<answer>{r['gt']}</answer>"), r["meta"]["direct_answer"]


# --- rewards of the reference answers -------------------------------------------------------------------------

TOY_REWARD = rewards.RewardConfig(open_scorer=toyworld.ToySceneScorer())  # the toy recipe's open-ended scorer


def test_reference_answers_earn_full_reward_and_the_teacher_errs_where_it_says(world):
    for record in all_records(world):
        kind, wrong = record["verifier_type"], record["meta"]["teacher_wrong"]
        clean = rewards.compute_reward(clean_answer(record), record, config=TOY_REWARD)
        direct = rewards.compute_reward(record["meta"]["direct_answer"], record, config=TOY_REWARD)
        if kind == "open":
            assert clean["reward"] > 0.6 and clean["correct"], (record["id"], clean)
            minimal = rewards.compute_reward(f"<think>.</think> <answer>{record['gt']}</answer>", record,
                                             config=TOY_REWARD)
            assert minimal["reward"] == 0.0, (record["id"], minimal)  # S(gt) is not above S(gt)
        elif kind == "iou":
            assert clean["reward"] >= 0.9, (record["id"], clean)
        else:
            assert clean["reward"] == 1.0, (record["id"], clean)
        assert direct["correct"] != wrong, (record["id"], direct, wrong)
        assert not (wrong and kind in ("mcq", "iou")), "mcq and iou answers do not depend on counts"


def test_the_teacher_over_counts_by_its_rate(tmp_path):
    """Where the teacher errs, it counts every shape twice: its answer is above the truth unless the count is 0."""
    n, rate = 600, 0.6
    records = toyworld.generate_split(n, seed=12, image_dir=str(tmp_path), prefix="t", teacher_error_rate=rate)
    counted = [r for r in records if r["verifier_type"] in ("digit", "math")]
    for record in counted:
        said = int(re.search(r"<answer>(-?\d+)</answer>", record["meta"]["direct_answer"])[1])
        assert (said > int(record["gt"])) == record["meta"]["teacher_wrong"], record
    # A zero count cannot be over-counted, so the share of wrong answers is below the rate: at most the rate.
    share = sum(r["meta"]["teacher_wrong"] for r in counted) / len(counted)
    assert 0.3 < share <= rate + 4 * math.sqrt(rate * (1 - rate) / len(counted)), share
    right = toyworld.generate_split(40, seed=12, image_dir=str(tmp_path), prefix="u", teacher_error_rate=0.0)
    assert not any(r["meta"]["teacher_wrong"] for r in right)


def test_pseudo_flips_are_wrong_and_the_rest_right(world):
    for record in world["files"]["sft.json"] + world["files"]["rl.json"]:
        pseudo = rewards.compute_reward(record["meta"]["pseudo_answer"], record, config=TOY_REWARD)
        clean = rewards.compute_reward(record["answer"], record, config=TOY_REWARD)
        if record["meta"]["pseudo_flipped"]:
            assert pseudo["reward"] < clean["reward"], (record["id"], pseudo)
            if record["verifier_type"] != "open":
                assert not pseudo["correct"], (record["id"], pseudo)
        else:
            assert pseudo["reward"] == clean["reward"], (record["id"], pseudo, clean)


# --- pseudo traces --------------------------------------------------------------------------------------------


def has_aha(text: str) -> bool:
    return any(word in text.lower() for word in AHA_WORDS)


def test_aha_words_only_in_pseudo_traces(world):
    for record in all_records(world):
        assert has_aha(record["meta"]["pseudo_answer"]), record["meta"]["pseudo_answer"]
        assert not has_aha(clean_answer(record)), clean_answer(record)
        assert not has_aha(record["meta"]["direct_answer"]), record["meta"]["direct_answer"]
        assert len(record["meta"]["pseudo_answer"]) > len(clean_answer(record))


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_flip_rate_is_respected(tmp_path, rate):
    n = 600 if rate == 0.3 else 50
    records = toyworld.generate_split(n, seed=11, image_dir=str(tmp_path), prefix="flip", pseudo_flip_rate=rate)
    flipped = [r["meta"]["pseudo_flipped"] for r in records]
    # A flipped trace ends with a revision ("mistake"); the others end with a confirmation.
    assert flipped == ["mistake" in r["meta"]["pseudo_answer"].lower() for r in records]
    tolerance = 4 * math.sqrt(rate * (1 - rate) / n)  # 4 binomial standard deviations
    assert abs(sum(flipped) / n - rate) <= tolerance


def test_bad_flip_rate_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pseudo_flip_rate"):
        toyworld.generate_split(1, seed=0, image_dir=str(tmp_path), prefix="x", pseudo_flip_rate=1.5)
    with pytest.raises(ValueError, match="teacher_error_rate"):
        toyworld.generate_split(1, seed=0, image_dir=str(tmp_path), prefix="x", teacher_error_rate=-0.1)


# --- splits, determinism, speed -------------------------------------------------------------------------------


def test_splits_are_disjoint(world):
    seen = {}
    for name in ("base.json", "sft.json", "rl.json", "test.json"):
        for record in world["files"][name]:
            key = (record["meta"]["scene_key"], record["question"])
            assert key not in seen, f"{record['id']} repeats {seen[key]}"
            seen[key] = record["id"]
    assert len(set(world["manifest"]["split_seeds"].values())) == len(toyworld.SPLITS)


def test_check_disjoint_catches_a_repeat(world):
    rl = world["files"]["rl.json"]
    with pytest.raises(ValueError, match="repeats"):
        toyworld.check_disjoint({"rl": rl, "test": [rl[0]]})


def test_generation_avoids_excluded_pairs(tmp_path):
    """Many one-object scenes make collisions likely; an exclude set from a first split must still hold."""
    used: set = set()
    first = toyworld.generate_split(300, seed=1, image_dir=str(tmp_path), prefix="a", exclude=used)
    second = toyworld.generate_split(300, seed=2, image_dir=str(tmp_path), prefix="b", exclude=used)
    toyworld.check_disjoint({"a": first, "b": second})
    assert len(used) == 600


def test_same_seed_same_files(world, tmp_path):
    toyworld.build_world(str(tmp_path), SMALL_SIZES, seed=3)
    for name in (*FILES, "world.json"):
        assert (tmp_path / name).read_bytes() == (world["out"] / name).read_bytes(), name
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == sorted(p.name for p in (world["out"] / "images").iterdir())
    for name in images[::17]:
        assert (tmp_path / "images" / name).read_bytes() == (world["out"] / "images" / name).read_bytes()


def test_other_seed_other_world(tmp_path):
    toyworld.build_world(str(tmp_path / "a"), {"base": 5, "sft": 5, "rl": 5, "test": 5}, seed=0)
    toyworld.build_world(str(tmp_path / "b"), {"base": 5, "sft": 5, "rl": 5, "test": 5}, seed=1)
    assert (tmp_path / "a" / "rl.json").read_text() != (tmp_path / "b" / "rl.json").read_text()


def test_manifest(world):
    manifest = json.loads((world["out"] / "world.json").read_text())
    assert manifest["sizes"] == SMALL_SIZES and manifest["seed"] == 3
    assert manifest["files"] == {name: len(world["files"][name]) for name in FILES}
    assert manifest["version"] == toyworld.VERSION


def test_the_careful_teacher_answers_its_share_of_the_base(tmp_path):
    manifest = toyworld.build_world(str(tmp_path), {"base": 400, "sft": 4, "rl": 4, "test": 4}, seed=5,
                                    careful_share=0.4)
    base = json.loads((tmp_path / "base.json").read_text())
    share = sum(r["meta"]["careful"] for r in base) / len(base)
    assert abs(share - 0.4) < 3 * math.sqrt(0.4 * 0.6 / len(base)), share
    assert manifest["careful_share"] == 0.4
    with pytest.raises(ValueError, match="careful_share"):
        toyworld.generate_split(1, seed=0, image_dir=str(tmp_path), prefix="x", careful_share=1.5)


def test_the_steps_of_every_trace_give_its_answer(world):
    """The careful teacher's steps produce its answer; a direct answer has no steps to check; a pseudo trace that
    revises a sum into a near miss disagrees with its own tally."""
    for record in all_records(world):
        assert toyworld.steps_agree(clean_answer(record), record) is True, clean_answer(record)
        assert toyworld.steps_agree(record["meta"]["direct_answer"], record) is None, record["meta"]["direct_answer"]
        if record["meta"]["pseudo_flipped"] and record["meta"]["template"] == "math_sum":
            assert toyworld.steps_agree(record["meta"]["pseudo_answer"], record) is False


def test_steps_agree_reads_the_tally_not_the_truth():
    record = {"question": "What is the number of red shapes plus the number of blue shapes?",
              "meta": {"template": "math_sum"}}
    tally = "red: 3. green: 0. blue: 1. yellow: 0. So red: 3 plus blue: 1 is 4."
    assert toyworld.steps_agree(f"<think>{tally}</think> <answer>4</answer>", record) is True
    assert toyworld.steps_agree(f"<think>{tally}</think> <answer>5</answer>", record) is False
    assert toyworld.steps_agree("<think>red: 3. green: 0.</think> <answer>3</answer>", record) is None  # no blue
    assert toyworld.steps_agree("<answer>4</answer>", record) is None


@pytest.mark.parametrize("knob, target, flag", [("teacher_error_rate", "direct_answer", "teacher_wrong"),
                                                 ("pseudo_flip_rate", "pseudo_answer", "pseudo_flipped")])
def test_a_rate_changes_only_its_own_target(tmp_path, knob, target, flag):
    """The rates are the experiment's knobs: scenes, questions and the other targets must not move with them."""
    low = toyworld.generate_split(100, seed=4, image_dir=str(tmp_path / "a"), prefix="x", **{knob: 0.1})
    high = toyworld.generate_split(100, seed=4, image_dir=str(tmp_path / "b"), prefix="x", **{knob: 0.9})
    other = ({"direct_answer", "pseudo_answer"} - {target}).pop()
    for a, b in zip(low, high, strict=True):
        assert (a["question"], a["gt"], a["answer"], a["meta"]["scene"], a["meta"][other]) == \
               (b["question"], b["gt"], b["answer"], b["meta"]["scene"], b["meta"][other])
    assert sum(a["meta"][flag] for a in low) < sum(b["meta"][flag] for b in high)


def test_the_scene_scorer_reads_the_worlds_own_vocabulary():
    """Every colour, shape and size the world knows is a fact the scorer checks: one true claim scores 1, the same
    claim with the count off by one scores -1."""
    for color in toyworld.COLORS:
        for shape in toyworld.SHAPES:
            for size in toyworld.SIZES:
                sample = {"id": "v", "meta": {"scene": {"objects": [{"shape": shape, "color": color, "size": size}]}}}
                assert toyworld.ToySceneScorer().score(f"1 {size} {color} {shape}", sample) == 1.0
                assert toyworld.ToySceneScorer().score(f"2 {color} {shape}s", sample) == -1.0
