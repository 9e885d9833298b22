"""data.py: both file styles, both SFT variants, every malformed case with its file:line error, skip_bad counts,
sampler resume, and collation through the real processor."""

import json
import math

import pytest
import torch
from PIL import Image

import data
import rewards
import toyworld
from vlaa_min.processor import SYSTEM_PROMPT, Processor
from vlaa_min.tokenizer import build_tokenizer

GOOD_ANSWER = "<think>Two red shapes.</think> <answer>2</answer>"


@pytest.fixture
def images(tmp_path):
    """An images root with two valid images in a source folder."""
    root = tmp_path / "images"
    (root / "clevr_math").mkdir(parents=True)
    Image.new("RGB", (56, 56), (255, 0, 0)).save(root / "clevr_math" / "a.png")
    Image.new("RGB", (84, 56), (0, 0, 255)).save(root / "clevr_math" / "b.png")
    return root


def record(**fields) -> dict:
    base = {"id": "r", "image": "clevr_math/a.png", "question": "How many red shapes?", "gt": "2",
            "verifier_type": "digit", "answer": GOOD_ANSWER}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}  # `...` removes a field


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_array(path, records) -> str:
    """One record per line after the opening '[': record k (from 1) starts on line k + 1."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return str(path)


# --- reading both file styles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_jsonl, write_array])
def test_both_file_styles_read_the_same(tmp_path, images, writer):
    records = [record(id=f"r{i}", gt=str(i)) for i in range(3)]
    loaded = data.load_records(writer(tmp_path / "x.data", records), images)  # extension says nothing
    assert [r["id"] for r in loaded] == ["r0", "r1", "r2"]
    assert [r["gt"] for r in loaded] == ["0", "1", "2"]
    assert loaded.skipped == {}


def test_json_lines_with_unicode_line_separators(tmp_path, images):
    path = tmp_path / "u.jsonl"
    records = [record(id="a", question="How many\u2028red shapes?\x85"), record(id="b")]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n")
    loaded = data.load_records(str(path), images)
    assert [r["id"] for r in loaded] == ["a", "b"]


def test_minified_array_and_byte_order_mark(tmp_path, images):
    path = tmp_path / "min.json"
    path.write_text("\ufeff" + json.dumps([record(id="a"), record(id="b")], separators=(",", ":")))
    assert [r["id"] for r in data.load_records(str(path), images)] == ["a", "b"]


def test_toy_world_files_load(tmp_path):
    toyworld.build_world(str(tmp_path), {"base": 5, "sft": 5, "rl": 5, "test": 5}, seed=0)
    for name in ("base.json", "sft.json", "sft_pseudo.json", "rl.json", "test.json"):
        loaded = data.load_records(str(tmp_path / name), require_answer=True)  # default root: <folder>/images
        raw = json.loads((tmp_path / name).read_text())
        assert [r["id"] for r in loaded] == [r["id"] for r in raw]
        assert [r["answer"] for r in loaded] == [r["answer"] for r in raw]


def test_sft_variants_answer_or_ds_answer(tmp_path, images):
    records = [
        record(id="formatted"),
        record(id="r1", answer=..., ds_answer="<think>\nCount them.\n</think>\n\nThere are 2."),
        record(id="r1-no-open-tag", answer=..., ds_answer="Count them.\n</think>\nThere are 2."),
        record(id="r1-no-tail", answer=..., ds_answer="<think>Count them.</think>"),
        record(id="r1-no-tags", answer=..., ds_answer="Count them."),
        record(id="r1-tagged", answer=..., ds_answer="<think>Count them.</think>\n<answer>2</answer>"),
    ]
    loaded = {r["id"]: r["answer"] for r in data.load_records(write_jsonl(tmp_path / "s.jsonl", records), images,
                                                                 require_answer=True)}
    assert loaded["formatted"] == GOOD_ANSWER
    assert loaded["r1"] == "<think>Count them.</think> <answer>There are 2.</answer>"
    assert loaded["r1-no-open-tag"] == "<think>Count them.</think> <answer>There are 2.</answer>"
    assert loaded["r1-no-tail"] == "<think>Count them.</think> <answer>2</answer>"  # the gt fills in
    assert loaded["r1-no-tags"] == "<think>Count them.</think> <answer>2</answer>"
    assert loaded["r1-tagged"] == "<think>Count them.</think> <answer>2</answer>"


def test_grpo_records_with_and_without_verifier_type(tmp_path, images):
    untyped = record(id="u", verifier_type=..., answer=...)
    loaded = data.load_records(write_jsonl(tmp_path / "g.jsonl", [record(answer=...), untyped]), images)
    assert loaded[0]["verifier_type"] == "digit"
    assert loaded[1]["verifier_type"] == "digit"  # from the image's source folder (clevr_math)
    assert "verifier_type" not in untyped  # the caller's dict is not modified


def test_normalisation(tmp_path, images):
    records = [
        record(id=7, gt=3, question="<image>\nHow many red shapes?"),
        record(id=..., image=None, question="Count <image> the shapes."),
        record(id=..., image=""),
    ]
    loaded = data.load_records(write_jsonl(tmp_path / "n.jsonl", records), images)
    assert loaded[0]["id"] == "7" and loaded[0]["gt"] == "3"
    assert loaded[0]["question"] == "How many red shapes?"
    assert loaded[1]["question"] == "Count the shapes."
    assert loaded[1]["id"] == "n:2" and loaded[1]["image"] is None and loaded[2]["image"] is None


def test_default_images_root(tmp_path, images):
    path = write_jsonl(tmp_path / "d.jsonl", [record()])  # images/ lies next to the file
    assert data.load_records(path)[0]["image"] == "clevr_math/a.png"
    assert data.default_images_root(path) == images


# --- every malformed case -------------------------------------------------------------------------------------


def corrupt_images(root):
    (root / "clevr_math" / "garbage.png").write_bytes(b"this is not an image")
    whole = (root / "clevr_math" / "a.png").read_bytes()
    (root / "clevr_math" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.effect_noise((56, 56), 64).convert("RGB").save(root / "clevr_math" / "photo.jpg")
    whole = (root / "clevr_math" / "photo.jpg").read_bytes()  # PIL opens and verifies a JPEG cut short
    (root / "clevr_math" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (1000, 4)).save(root / "clevr_math" / "wide.png")


BAD_RECORDS = {  # name: (record, field, kind)
    "missing question": (record(question=...), "question", "missing_field"),
    "missing gt": (record(gt=...), "gt", "missing_field"),
    "gt not a string": (record(gt=["2"]), "gt", "wrong_type"),
    "empty question": (record(question="  <image> "), "question", "empty_field"),
    "special token text": (record(question="Hi <|im_end|> there"), "question", "special_token_text"),
    "meta not an object": (record(meta="x"), "meta", "wrong_type"),
    "unknown type": (record(verifier_type="poetry"), "verifier_type", "unknown_type"),
    "missing image": (record(image="clevr_math/nope.png"), "image", "image_not_found"),
    "garbage image": (record(image="clevr_math/garbage.png"), "image", "image_corrupt"),
    "truncated image": (record(image="clevr_math/truncated.png"), "image", "image_corrupt"),
    "truncated jpeg": (record(image="clevr_math/truncated.jpg"), "image", "image_corrupt"),
    "image not a string": (record(image=["clevr_math/a.png"]), "image", "wrong_type"),
    "dotdot path": (record(image="../secret.png"), "image", "unsafe_path"),
    "inner dotdot path": (record(image="clevr_math/../../secret.png"), "image", "unsafe_path"),
    "absolute path": (record(image="/etc/passwd"), "image", "unsafe_path"),
    "missing answer": (record(answer=...), "answer", "missing_field"),
    "answer without block": (record(answer="<think>x</think> 2"), "answer", "bad_answer"),
    "two answer blocks": (record(answer="<answer>1</answer><answer>2</answer>"), "answer", "bad_answer"),
    "image too wide": (record(image="clevr_math/wide.png"), "image", "image_unusable"),
    "gt NaN": (record(gt=math.nan), "gt", "wrong_type"),
    # a ground truth the reward cannot score for its type
    "digit gt not a number": (record(gt="many"), "gt", "bad_gt"),
    "inverted box": (record(verifier_type="iou", gt="[0.5, 0.5, 0.2, 0.9]"), "gt", "bad_gt"),
    "pixel box without image size": (record(verifier_type="iou", gt="[1, 1, 9, 9]", meta={"box_format": "pixel"}),
                                     "meta.image_size", "bad_gt"),
    "math gt unparsable": (record(verifier_type="math", gt="$$$"), "gt", "bad_gt"),
    "malformed toy scene": (record(verifier_type="open", gt="2 circles", meta={"scene": {"objects": [{}]}}),
                            "meta.scene", "bad_gt"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
@pytest.mark.parametrize("writer", [write_jsonl, write_array])
def test_bad_record_names_file_line_and_field(tmp_path, images, name, writer):
    corrupt_images(images)
    bad, field, kind = BAD_RECORDS[name]
    path = writer(tmp_path / "bad.json", [record(id="ok1"), record(id="ok2"), bad])
    toy_scene = "scene" in bad.get("meta", {})  # a scene is checked by the toy recipe's scorer
    config = rewards.RewardConfig(open_scorer="toyworld:ToySceneScorer") if toy_scene else None
    with pytest.raises(data.DataError) as caught:
        data.load_records(path, images, require_answer=True, reward_config=config)
    where = f"{path}:3 " if writer is write_jsonl else f"{path}:record 3 (line 4) "  # the third record
    assert str(caught.value).startswith(where), str(caught.value)
    assert f": {field}: " in str(caught.value)
    assert (caught.value.field, caught.value.kind) == (field, kind)


def test_not_an_object(tmp_path, images):
    path = write_array(tmp_path / "a.json", [record(), "just a string"])
    with pytest.raises(data.DataError, match=r"a\.json:record 2 \(line 3\): record: expected a JSON object"):
        data.load_records(path, images)


def test_bad_json_line(tmp_path, images):
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps(record()) + "\n\n" + '{"id": "x", "question": \n' + json.dumps(record()) + "\n")
    with pytest.raises(data.DataError, match=r"l\.jsonl:3: json: invalid JSON line") as caught:
        data.load_records(str(path), images)
    assert caught.value.kind == "bad_json"


def test_a_byte_that_is_not_utf8_names_its_line_and_skips_only_its_record(tmp_path, images, capsys):
    lines = [json.dumps(record(id=f"r{i}", question="Combien de formes rouges ?")).encode() for i in range(3)]
    lines[1] = lines[1].replace("Combien".encode(), b"Caf\xe9")  # Latin-1, not UTF-8
    path = tmp_path / "l.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    column = lines[1].index(b"\xe9") + 1
    with pytest.raises(data.DataError, match=rf"l\.jsonl:2: encoding: not UTF-8 text: byte 0xe9 at column {column}$"):
        data.load_records(str(path), images)
    loaded = data.load_records(str(path), images, skip_bad=True)
    assert [r["id"] for r in loaded] == ["r0", "r2"] and loaded.skipped == {"not_utf8": 1}
    assert "l.jsonl:2: encoding: not UTF-8" in capsys.readouterr().out


@pytest.mark.parametrize("content, line", [(b'[\n{"id": "a"},\n{"id": "\xff"}\n]', 3), (b"\xff\xfe[]", 1)])
def test_a_byte_that_is_not_utf8_in_an_array_rejects_the_file_at_its_line(tmp_path, images, content, line):
    path = tmp_path / "a.json"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=rf"a\.json:{line}: encoding: not UTF-8 text: byte 0xff"):
        data.load_records(str(path), images, skip_bad=True)  # an array cannot be resynchronised


@pytest.mark.parametrize("text, line", [
    ('[\n{"id": 1},\n{"id": 2,\n]', 4),  # a trailing comma inside the second record
    ('[\n{"id": 1}\n{"id": 2}\n]', 3),  # a missing comma between records
    ('[\n{"id": 1}\n] extra', 3),
])
def test_bad_json_array(tmp_path, images, text, line):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(data.DataError, match=rf"bad\.json:{line}: json: invalid JSON"):
        data.load_records(str(path), images, skip_bad=True)  # an array cannot be resynchronised


@pytest.mark.parametrize("text, problem", [("", "empty"), ("  \n", "empty"), ("id,question\n", "neither")])
def test_not_records_at_all(tmp_path, images, text, problem):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(data.DataError, match=problem):
        data.load_records(str(path), images)


def test_missing_file_and_root(tmp_path, images):
    with pytest.raises(data.DataError, match="not found"):
        data.load_records(str(tmp_path / "nope.json"), images)
    with pytest.raises(data.DataError, match="images_root"):
        data.load_records(write_jsonl(tmp_path / "x.jsonl", [record()]), tmp_path / "no_such_folder")


def test_a_decompression_bomb_is_refused_by_its_pixel_count(tmp_path, images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 56 * 56 - 1)  # a.png is 56 x 56
    with pytest.raises(data.DataError, match=r"x\.jsonl:1 \[id r\]: image: .*more than 3135 pixels") as caught:
        data.load_records(write_jsonl(tmp_path / "x.jsonl", [record()]), images)
    assert caught.value.kind == "image_too_large"


def test_duplicate_ids_are_refused_or_skipped(tmp_path, images, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [record(id="a"), record(id="b"), record(id="a")])
    with pytest.raises(data.DataError, match=r"d\.jsonl:3 \[id a\]: id: duplicate of the record at .*d\.jsonl:1"):
        data.load_records(path, images)
    assert [r["id"] for r in data.load_records(path, images, skip_bad=True)] == ["a", "b"]


# --- skip_bad -------------------------------------------------------------------------------------------------


def test_skip_bad_counts_by_problem(tmp_path, images, capsys):
    corrupt_images(images)
    good = [record(id=f"g{i}") for i in range(4)]
    bad = [record(question=...), record(gt=...), record(image="clevr_math/nope.png"),
           record(image="clevr_math/garbage.png"), record(image="../x.png"), record(image="/x.png")]
    path = tmp_path / "mix.jsonl"
    lines = [json.dumps(r) for r in good[:2] + bad] + ["{not json"] + [json.dumps(r) for r in good[2:]]
    path.write_text("\n".join(lines) + "\n")
    loaded = data.load_records(str(path), images, skip_bad=True)
    assert [r["id"] for r in loaded] == ["g0", "g1", "g2", "g3"]
    assert loaded.skipped == {"missing_field": 2, "image_not_found": 1, "image_corrupt": 1, "unsafe_path": 2,
                              "bad_json": 1}
    printed = capsys.readouterr().out
    assert "skipped 7 bad record(s)" in printed and "kept 4" in printed
    assert f"{path}:3 [id r]: question: missing" in printed  # the first messages are shown


def test_skip_bad_with_nothing_left_is_an_error(tmp_path, images):
    with pytest.raises(data.DataError, match="no valid records"):
        data.load_records(write_jsonl(tmp_path / "x.jsonl", [record(gt=...)]), images, skip_bad=True)


# --- load_image -----------------------------------------------------------------------------------------------


def test_load_image(images):
    Image.new("L", (30, 20), 128).save(images / "gray.png")
    image = data.load_image(images, "gray.png")
    assert image.mode == "RGB" and image.size == (30, 20)
    with pytest.raises(data.DataError, match="could leave the images root") as caught:
        data.load_image(images, "../gray.png")
    assert caught.value.kind == "unsafe_path"
    with pytest.raises(data.DataError) as caught:
        data.load_image(images, "missing.png")
    assert caught.value.kind == "image_not_found"


def test_load_image_turns_a_photo_upright_as_its_exif_says(images):
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 30))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: show the stored pixels turned 90 degrees clockwise
    stored.save(images / "phone.jpg", exif=exif, quality=95)
    image = data.load_image(images, "phone.jpg")
    assert image.size == (30, 60)  # turned clockwise, the stored left half is the top
    assert image.getpixel((15, 5))[0] > 200 and image.getpixel((15, 55))[2] > 200


def test_a_jpeg_with_bytes_after_its_end_is_not_taken_for_a_cut_short_one(tmp_path, images):
    Image.effect_noise((56, 56), 64).convert("RGB").save(images / "clevr_math" / "padded.jpg")
    with open(images / "clevr_math" / "padded.jpg", "ab") as f:
        f.write(b"\0" * 16)  # some cameras and editors leave padding after the end-of-image marker
    path = write_jsonl(tmp_path / "ok.jsonl", [record(image="clevr_math/padded.jpg")])
    assert [r["id"] for r in data.load_records(path, images, require_answer=True)] == ["r"]


# --- EpochSampler ---------------------------------------------------------------------------------------------


def test_sampler_epochs_are_permutations_and_deterministic():
    sampler = data.EpochSampler(10, seed=5)
    epochs = [sampler.next_batch(10) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and sampler.epoch == 3
    assert len({tuple(e) for e in epochs}) == 3  # a new order each epoch
    assert data.EpochSampler(10, seed=5).next_batch(10) == epochs[0]
    assert data.EpochSampler(10, seed=6).next_batch(10) != epochs[0]


def test_sampler_next_batch_crosses_epochs_without_dropping():
    sampler = data.EpochSampler(7, seed=0)
    stream = [i for _ in range(5) for i in sampler.next_batch(4)]  # 20 indices = 2 epochs + 6
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    assert sampler.epoch == 2 and sampler.position == 6


def test_sampler_without_shuffle():
    sampler = data.EpochSampler(5, seed=0, shuffle=False)
    assert sampler.next_batch(3) == [0, 1, 2] and sampler.next_batch(3) == [3, 4, 0]


@pytest.mark.parametrize("consumed", [0, 3, 7, 10, 23])
def test_sampler_resume_mid_epoch(consumed):
    sampler = data.EpochSampler(10, seed=1)
    for _ in range(consumed):
        sampler.next_batch(1)
    state = json.loads(json.dumps(sampler.state_dict()))  # as stored in a checkpoint
    expected = [sampler.next_batch(4) for _ in range(6)]
    resumed = data.EpochSampler(10, seed=123)  # the saved seed wins
    resumed.load_state_dict(state)
    assert [resumed.next_batch(4) for _ in range(6)] == expected
    assert state["epoch"] == consumed // 10 and state["position"] == consumed % 10


def test_sampler_rejects_a_changed_dataset():
    state = data.EpochSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="10 records but the data has 11"):
        data.EpochSampler(11, seed=1).load_state_dict(state)


def test_sampler_bad_arguments():
    with pytest.raises(ValueError):
        data.EpochSampler(0, seed=0)
    with pytest.raises(ValueError):
        data.EpochSampler(3, seed=0).next_batch(0)


# --- collation through the real processor ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    texts = [GOOD_ANSWER, "How many red shapes?", SYSTEM_PROMPT] * 3
    return Processor(build_tokenizer(texts, vocab_size=400))


def test_prompts_longer_than_the_limit_fail_at_load_or_are_skipped(tmp_path, images, processor, capsys):
    long_question = "How many red shapes? " * 40
    path = write_jsonl(tmp_path / "long.jsonl", [record(id="short"), record(id="long", question=long_question)])
    records = data.load_records(path, images)
    limit = processor.prompt_length(records[0]["question"], [(56, 56)]) + 1
    assert len(processor.encode_prompt(records[0]["question"], [Image.new("RGB", (56, 56))]).input_ids) == limit - 1
    with pytest.raises(data.DataError, match=r"long\.jsonl:2 \[id long\]: question: the prompt is \d+ tokens "
                                             r"\(image included\), more than --max-length"):
        data.check_prompt_lengths(records, path, processor, images, limit, "--max-length", leave_room=True)
    kept = data.check_prompt_lengths(records, path, processor, images, limit, "--max-length", leave_room=True,
                                     skip_bad=True)
    assert [r["id"] for r in kept] == ["short"] and kept.skipped == {"too_long": 1}
    assert "skipped 1 bad record(s) (too_long 1)" in capsys.readouterr().out


def test_collate_prompts_shapes(tmp_path, images, processor):
    records = data.load_records(write_jsonl(tmp_path / "p.jsonl", [
        record(id="a"), record(id="b", image="clevr_math/b.png"), record(id="text", image=...)]), images)
    batch = data.collate_prompts(records, processor, images)
    ip = processor.image_processor
    grids = [(1, 56 // ip.patch_size, 56 // ip.patch_size), (1, 56 // ip.patch_size, 84 // ip.patch_size)]
    patches = sum(math.prod(g) for g in grids)
    batch_size, width = batch.input_ids.shape
    assert batch_size == 3 and batch.attention_mask.shape == (3, width)
    assert batch.position_ids.shape == (3, 3, width)
    assert batch.image_grid_thw.tolist() == [list(g) for g in grids]  # one image per prompt, once
    assert batch.pixel_values.shape == (patches, 3 * ip.temporal_patch_size * ip.patch_size**2)
    pads = (batch.input_ids == processor.image_token_id).sum(dim=1).tolist()
    assert pads == [math.prod(g) // ip.merge_size**2 for g in grids] + [0]
    assert batch.prompt_lengths.tolist() == batch.attention_mask.sum(dim=1).tolist()
    assert batch.attention_mask[:, -1].all()  # left padded: every row ends at the last column
    single = processor.encode_prompt(records[0]["question"], [data.load_image(images, "clevr_math/a.png")])
    assert batch.input_ids[0, -len(single.input_ids):].tolist() == single.input_ids


def test_collate_sft_shapes_and_loss_mask(tmp_path, images, processor):
    answers = [GOOD_ANSWER, "<think>Three.</think> <answer>3</answer>"]
    records = data.load_records(write_jsonl(tmp_path / "s.jsonl", [
        record(id="a", answer=answers[0]), record(id="b", image=..., answer=answers[1])]), images,
        require_answer=True)
    batch = data.collate_sft(records, processor, images)
    assert batch.input_ids.shape == batch.loss_mask.shape == batch.attention_mask.shape
    assert batch.position_ids.shape == (3, *batch.input_ids.shape)
    assert batch.lengths.tolist() == batch.attention_mask.sum(dim=1).tolist()
    assert batch.image_grid_thw.shape == (1, 3)  # only the first record has an image
    for row, answer in enumerate(answers):
        trained = batch.input_ids[row][batch.loss_mask[row]]
        assert trained[-1].item() == processor.eos_token_id
        assert processor.decode(trained[:-1]) == answer


def test_collate_errors_name_the_record(tmp_path, images, processor):
    records = data.load_records(write_jsonl(tmp_path / "p.jsonl", [record(id="long")]), images)
    with pytest.raises(data.DataError, match=r"record long: question: .*max_length"):
        data.collate_prompts(records, processor, images, max_prompt_length=5)
    records = data.load_records(write_jsonl(tmp_path / "q.jsonl", [record(id="noanswer", answer=...)]), images)
    with pytest.raises(data.DataError, match="record noanswer: answer: missing"):
        data.collate_sft(records, processor, images)


def test_collate_toy_world_batch(tmp_path, processor):
    toyworld.build_world(str(tmp_path), {"base": 5, "sft": 5, "rl": 5, "test": 5}, seed=0)
    records = data.load_records(str(tmp_path / "rl.json"))
    sampler = data.EpochSampler(len(records), seed=0)
    batch = data.collate_prompts([records[i] for i in sampler.next_batch(4)], processor, tmp_path / "images")
    # 112x112 -> an 8x8 patch grid -> 16 merged tokens, one per 28-px cell of the toy grid.
    assert batch.image_grid_thw.tolist() == [[1, 8, 8]] * 4
    assert ((batch.input_ids == processor.image_token_id).sum(dim=1) == toyworld.GRID**2).all()
    assert batch.pixel_values.dtype == torch.float32


def test_encode_sft_reports_truncation(tmp_path, images, processor):
    records = data.load_records(write_jsonl(tmp_path / "t.jsonl", [record(image=...)]), images, require_answer=True)
    full = data.encode_sft(records[0], processor, images)
    assert not full.truncated
    cut = data.encode_sft(records[0], processor, images, max_length=len(full.input_ids) - 2)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 2
