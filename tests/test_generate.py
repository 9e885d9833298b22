"""The rollout engine (vlaa_min/generate.py) against references: a full recompute per token, transformers'
generate, one prompt at a time, a separate forward pass for the log-probs, and the sampling distribution.

Tiny random models in fp32 on CPU; weights re-drawn with std 0.1 (as in test_model.py) so that the
next-token distributions are far from uniform and greedy choices are not near-ties.
"""

import pytest
import torch
from transformers import (
    Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration,
)

from vlaa_min.config import ModelConfig
from vlaa_min.generate import (Engine, SamplingParams, concat_rollouts, filter_logits, inverse_cdf_sample,
                               sample_tokens)
from vlaa_min.logprobs import sequence_logprobs
from vlaa_min.model import VLModel
from vlaa_min.processor import PromptBatch
from vlaa_min.rope import mrope_position_ids
from tests.helpers import randomize_

PAD, EOS, VISION_START, VISION_END, IMAGE, VIDEO = 0, 1, 2, 3, 4, 5  # ModelConfig.tiny's default ids
VOCAB = 1024
MERGE = 2
HF_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
              "qwen3_vl": Qwen3VLForConditionalGeneration}
# Prompts of different lengths, with images of different sizes and one without an image.
MIXED_PROMPTS = [(5, (1, 4, 4)), (11, (1, 8, 6)), (7, None)]


# --------------------------------------------------------------------------- helpers


def make_model(model_type: str = "qwen2_5_vl", seed: int = 0, bias: dict[int, float] | None = None) -> VLModel:
    """A tiny random model; `bias` adds a bias to lm_head's logits of the given token ids.

    By default the <|image_pad|> logit gets -1e4: a generated image token could not be fed back through an
    uncached forward (it would be counted as an image placeholder), so the tests keep it out of completions.
    """
    model = VLModel(ModelConfig.tiny(model_type, vocab_size=VOCAB)).eval()
    randomize_(model, seed)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight  # the same (tied) parameter
    with torch.no_grad():
        head.bias.zero_()
        for token, value in ({IMAGE: -1e4} | (bias or {})).items():
            head.bias[token] = value
    model.lm_head = head
    return model


def make_batch(specs: list[tuple[int, tuple[int, int, int] | None]], seed: int = 0,
               patch_size: int = 14) -> PromptBatch:
    """Left-padded prompts; each spec is (text tokens, image grid_thw or None). Pixel values are random."""
    generator = torch.Generator().manual_seed(seed)
    patch_dim = 3 * 2 * patch_size**2  # channels * temporal_patch_size * patch_size^2
    rows, pixels, grids = [], [], []
    for n_text, grid in specs:
        text = torch.randint(VIDEO + 1, VOCAB, (n_text,), generator=generator).tolist()
        if grid is None:
            rows.append(text)
            continue
        t, h, w = grid
        rows.append(text[:2] + [VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END] + text[2:])
        pixels.append(torch.randn(t * h * w, patch_dim, generator=generator))
        grids.append(torch.tensor(grid))
    lengths = torch.tensor([len(row) for row in rows])
    width = int(lengths.max())
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row)
    attention_mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]  # (B, T)
    image_grid_thw = torch.stack(grids) if grids else None
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(input_ids, attention_mask, image_grid_thw),
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=image_grid_thw,
        prompt_lengths=lengths,
    )


def positions(input_ids, attention_mask, image_grid_thw):
    return mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id=IMAGE,
                              spatial_merge_size=MERGE)  # fmt: skip


def make_batch_row(batch: PromptBatch, index: int) -> PromptBatch:
    """Prompt `index` of a batch on its own (its padding removed)."""
    keep = batch.attention_mask[index]
    input_ids = batch.input_ids[index][keep][None]
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    pixel_values, image_grid_thw = None, None
    if (input_ids == IMAGE).any():
        has_image = (batch.input_ids == IMAGE).any(dim=1)
        image_index = int(has_image[:index].sum())
        sizes = batch.image_grid_thw.prod(dim=1)
        start = int(sizes[:image_index].sum())
        pixel_values = batch.pixel_values[start : start + int(sizes[image_index])]
        image_grid_thw = batch.image_grid_thw[image_index : image_index + 1]
    return PromptBatch(input_ids, attention_mask, positions(input_ids, attention_mask, image_grid_thw),
                       pixel_values, image_grid_thw, torch.tensor([input_ids.shape[1]]))  # fmt: skip


def repeat_images(batch: PromptBatch, repeats: int):
    """pixel_values / image_grid_thw for the rows of batch repeated `repeats` times each (prompt-major)."""
    if batch.image_grid_thw is None:
        return None, None
    has_image = (batch.input_ids == IMAGE).any(dim=1).tolist()
    per_image = batch.pixel_values.split(batch.image_grid_thw.prod(dim=1).tolist())
    images = iter(zip(per_image, batch.image_grid_thw))
    per_row = [next(images) if has else None for has in has_image]
    chosen = [image for image in per_row for _ in range(repeats) if image is not None]
    return torch.cat([pixels for pixels, _ in chosen]), torch.stack([grid for _, grid in chosen])


def greedy_by_recompute(model: VLModel, batch: PromptBatch, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens (B, max_new_tokens) from a full uncached forward over prompt + completion per token."""
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    chosen = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            position_ids = positions(input_ids, attention_mask, batch.image_grid_thw)
            logits = model(input_ids, position_ids, attention_mask, batch.pixel_values, batch.image_grid_thw)
            token = logits[:, -1].argmax(dim=-1)  # (B,)
            chosen.append(token)
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token[:, None], dtype=torch.bool)], dim=1)
    return torch.stack(chosen, dim=1)


def logprobs_by_forward(model: VLModel, batch: PromptBatch, rollout, repeats: int, temperature: float):
    """(N, L) log-probs of the rollout's completion tokens from one uncached forward over prompt + completion."""
    rows = rollout.prompt_index
    width = rollout.completion_ids.shape[1]
    completion_mask = torch.arange(width)[None, :] < rollout.completion_lengths[:, None]  # (N, L)
    input_ids = torch.cat([batch.input_ids[rows], rollout.completion_ids], dim=1)
    attention_mask = torch.cat([batch.attention_mask[rows], completion_mask], dim=1)
    pixel_values, image_grid_thw = repeat_images(batch, repeats)
    with torch.no_grad():
        hidden = model(input_ids, positions(input_ids, attention_mask, image_grid_thw), attention_mask,
                       pixel_values, image_grid_thw, return_hidden=True)  # fmt: skip
        target = torch.cat([torch.zeros_like(batch.attention_mask[rows]), completion_mask], dim=1)
        logprobs, _ = sequence_logprobs(hidden, input_ids, target, model.lm_head, temperature)
    return logprobs[:, batch.input_ids.shape[1] :]


def generate(model, batch, num_samples, seed=0, device="cpu", compile=False, cuda_graphs=False, **params):
    return Engine(model, PAD, compile=compile, cuda_graphs=cuda_graphs).generate(
        batch.to(device), num_samples, SamplingParams(**params), torch.Generator(device).manual_seed(seed)
    )


# --------------------------------------------------------------------------- greedy parity


@pytest.mark.parametrize("model_type", list(HF_CLASSES))
def test_greedy_equals_full_recompute_without_cache(model_type):
    model = make_model(model_type)
    batch = make_batch(MIXED_PROMPTS, patch_size=model.config.vision.patch_size)
    rollout = generate(model, batch, 1, max_new_tokens=10, greedy=True)
    assert torch.equal(rollout.completion_ids, greedy_by_recompute(model, batch, 10))


@pytest.mark.parametrize("model_type", list(HF_CLASSES))
def test_greedy_equals_transformers_generate(model_type, tmp_path):
    model = VLModel(ModelConfig.tiny(model_type, vocab_size=VOCAB)).eval()
    randomize_(model, seed=1)
    model.save_pretrained(tmp_path)
    theirs = HF_CLASSES[model_type].from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    theirs.generation_config.eos_token_id = None  # both run the full max_new_tokens
    batch = make_batch(MIXED_PROMPTS, seed=1, patch_size=model.config.vision.patch_size)

    rollout = generate(model, batch, 1, max_new_tokens=10, greedy=True)
    with torch.no_grad():
        reference = theirs.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            mm_token_type_ids=(batch.input_ids == IMAGE).long(),  # transformers' MRoPE needs the image spans
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=PAD,
        )
    assert torch.equal(rollout.completion_ids, reference[:, batch.input_ids.shape[1] :])


def test_mixed_length_batch_equals_each_prompt_alone():
    model = make_model()
    batch = make_batch(MIXED_PROMPTS, seed=3)
    together = generate(model, batch, 2, max_new_tokens=8, greedy=True)
    for index, spec in enumerate(MIXED_PROMPTS):
        alone = generate(model, make_batch_row(batch, index), 1, max_new_tokens=8, greedy=True)
        for row in (2 * index, 2 * index + 1):
            assert torch.equal(together.completion_ids[row], alone.completion_ids[0]), spec
            assert torch.allclose(together.logprobs[row], alone.logprobs[0], atol=1e-5), spec


def test_a_rollout_in_engine_calls_concatenates_to_one_call():
    """train_grpo's --rollout-batch-size: the first two prompts in one call, the third in another (their widths
    differ: 10 and 6 tokens), concatenated, equal all three in one call."""
    model = make_model(bias={EOS: 2.0})  # greedy completions of 1, 10 and 6 tokens
    batch = make_batch(MIXED_PROMPTS, seed=3)
    params = dict(max_new_tokens=10, greedy=True, stop_token_ids=(EOS,))
    whole = generate(model, batch, 2, **params)
    parts = [generate(model, make_batch(MIXED_PROMPTS[:2], seed=3), 2, **params),
             generate(model, make_batch_row(batch, 2), 2, **params)]
    assert [part.completion_ids.shape[1] for part in parts] == [10, 6]
    joined = concat_rollouts(parts, PAD)
    for name in ("completion_ids", "completion_lengths", "finished_by_stop", "prompt_index"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert joined.finish_reasons == whole.finish_reasons
    torch.testing.assert_close(joined.logprobs, whole.logprobs, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_samples_other_seed_other_samples():
    model = make_model()
    batch = make_batch(MIXED_PROMPTS)
    first = generate(model, batch, 4, seed=7, max_new_tokens=6)
    again = generate(model, batch, 4, seed=7, max_new_tokens=6)
    other = generate(model, batch, 4, seed=8, max_new_tokens=6)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_rows_of_a_group_draw_their_own_first_token():
    model = make_model()
    batch = make_batch(MIXED_PROMPTS)
    group = 8
    rollout = generate(model, batch, group, max_new_tokens=4, temperature=1.0)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pixel_values,
                       batch.image_grid_thw)[:, -1]  # fmt: skip
    # Chance that G independent draws all agree: sum_v p_v^G. Tiny here, so identical first tokens in a
    # group would mean the first token was drawn once per prompt and copied.
    all_agree = (torch.softmax(logits, dim=-1) ** group).sum(dim=-1)
    assert (all_agree < 1e-6).all()
    first_tokens = rollout.completion_ids[:, 0].view(len(MIXED_PROMPTS), group)
    for prompt in range(len(MIXED_PROMPTS)):
        assert first_tokens[prompt].unique().numel() > 1
    assert torch.equal(rollout.prompt_index, torch.arange(len(MIXED_PROMPTS)).repeat_interleave(group))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_returned_logprobs_equal_a_separate_forward_pass(temperature):
    model = make_model(bias={EOS: 3.0})  # some rows stop early, so padding after a stop is covered
    batch = make_batch(MIXED_PROMPTS, seed=4)
    rollout = generate(model, batch, 3, seed=5, max_new_tokens=12, temperature=temperature, stop_token_ids=(EOS,))
    assert 0 < int(rollout.finished_by_stop.sum()) < len(rollout.finish_reasons)
    reference = logprobs_by_forward(model, batch, rollout, 3, temperature)
    assert torch.allclose(rollout.logprobs, reference, atol=1e-4)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = make_model()
    batch = make_batch(MIXED_PROMPTS)
    greedy = generate(model, batch, 2, max_new_tokens=8, greedy=True)
    for filters in ({"top_k": 1}, {"top_p": 1e-6}):
        filtered = generate(model, batch, 2, max_new_tokens=8, temperature=1.0, **filters)
        assert torch.equal(filtered.completion_ids, greedy.completion_ids), filters
        assert torch.allclose(filtered.logprobs, greedy.logprobs, atol=1e-6), filters


def test_filter_logits_follows_the_definitions():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda filtered: set(torch.isfinite(filtered[0]).nonzero().flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == {1, 3}
    # Nucleus: the most likely tokens until their mass reaches top_p (0.5 < 0.7 <= 0.5 + 0.3).
    assert kept(filter_logits(logits, top_k=0, top_p=0.7)) == {1, 3}
    assert kept(filter_logits(logits, top_k=0, top_p=0.5)) == {1}
    assert kept(filter_logits(logits, top_k=0, top_p=0.81)) == {1, 3, 2}
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.7)])
def test_sampled_frequencies_match_the_filtered_distribution(top_k, top_p):
    draws, temperature = 40_000, 0.8
    logits = torch.tensor([0.3, 2.0, 1.1, 1.6, -0.5]).expand(draws, -1)
    expected = torch.softmax(filter_logits(logits[:1] / temperature, top_k, top_p), dim=-1)[0]
    uniform = torch.rand(draws, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, logprobs = sample_tokens(logits, params, uniform)
    frequencies = torch.bincount(tokens, minlength=5).float() / draws
    # Each frequency is a mean of `draws` Bernoulli(p) variables: within 5 standard errors.
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((frequencies - expected).abs() <= 5 * standard_error + 1e-9).all(), (frequencies, expected)
    # Log-probs are always those of the unfiltered temperature-scaled distribution.
    unfiltered = torch.log_softmax(logits[0] / temperature, dim=-1)
    assert torch.allclose(logprobs, unfiltered[tokens])


def test_ids_past_the_vocabulary_are_never_drawn():
    # The last two ids stand for embedding rows past the tokenizer; they hold the largest logits here.
    logits = torch.tensor([0.3, 2.0, 1.1, 9.0, 8.0]).expand(1000, -1)
    uniform = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for greedy, banned in ((False, (1,)), (True, (1,)), (False, ())):  # the last one is the plain sampler's path
        params = SamplingParams(max_new_tokens=1, greedy=greedy, banned_token_ids=banned, vocab_size=3)
        tokens, logprobs = sample_tokens(logits, params, uniform)
        allowed = {0, 1, 2} - set(banned)
        assert set(tokens.tolist()) == ({2} if greedy else allowed)
        assert torch.allclose(logprobs, torch.log_softmax(logits[0], dim=-1)[tokens])  # still unfiltered
    with pytest.raises(ValueError, match="vocab_size"):
        SamplingParams(max_new_tokens=1, vocab_size=-1)


def test_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    # The extreme uniforms: 0 lands on the last token with mass, the largest float below 1 on the first.
    extremes = torch.tensor([0.0, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()])
    assert inverse_cdf_sample(probs.expand(2, -1), extremes).tolist() == [3, 1]
    # The boundary between the two tokens: (1 - U) * total == P(token 1) still draws token 1.
    assert inverse_cdf_sample(probs[None], torch.tensor([0.75])).tolist() == [1]


# --------------------------------------------------------------------------- stopping


def test_stop_tokens_lengths_padding_and_finish_reasons():
    model = make_model(bias={EOS: 3.0})
    batch = make_batch(MIXED_PROMPTS, seed=6)
    max_new = 12
    rollout = generate(model, batch, 4, seed=1, max_new_tokens=max_new, stop_token_ids=(EOS, VIDEO))
    stops = torch.tensor([EOS, VIDEO])
    assert 0 < int(rollout.finished_by_stop.sum()) < len(rollout.finish_reasons)
    assert rollout.completion_ids.shape[1] == int(rollout.completion_lengths.max())
    for row, length in enumerate(rollout.completion_lengths.tolist()):
        tokens, logprobs = rollout.completion_ids[row], rollout.logprobs[row]
        is_stop = torch.isin(tokens[:length], stops)
        if rollout.finished_by_stop[row]:
            assert rollout.finish_reasons[row] == "stop"
            assert is_stop[-1] and not is_stop[:-1].any()  # ends at its first stop token, which is kept
        else:
            assert rollout.finish_reasons[row] == "length"
            assert length == max_new and not is_stop.any()
        assert (tokens[length:] == PAD).all() and (logprobs[length:] == 0).all()
        assert (logprobs[:length] < 0).all()


def test_max_new_tokens_without_stop_tokens():
    rollout = generate(make_model(bias={EOS: 3.0}), make_batch(MIXED_PROMPTS), 2, max_new_tokens=5)
    assert rollout.completion_ids.shape == (6, 5)
    assert (rollout.completion_lengths == 5).all() and not rollout.finished_by_stop.any()
    assert rollout.finish_reasons == ["length"] * 6
    moved = rollout.to("cpu")
    assert torch.equal(moved.logprobs, rollout.logprobs) and moved.finish_reasons == rollout.finish_reasons


def test_all_rows_stopped_ends_the_loop_at_the_next_check():
    model = make_model(bias={EOS: 1e4})  # every row's first token is the stop token
    forward_calls = []
    model.register_forward_pre_hook(lambda module, args: forward_calls.append(1))
    sync_every = 4
    rollout = Engine(model, PAD, sync_every=sync_every).generate(
        make_batch(MIXED_PROMPTS), 2, SamplingParams(max_new_tokens=50, stop_token_ids=(EOS,)),
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert rollout.completion_ids.tolist() == [[EOS]] * 6
    assert (rollout.completion_lengths == 1).all() and rollout.finish_reasons == ["stop"] * 6
    # The prefill, then decode steps until the first "all done" check after step sync_every - 1.
    assert len(forward_calls) == 1 + (sync_every - 1)


# --------------------------------------------------------------------------- errors and compile


def test_bad_inputs_are_clear_errors():
    model = make_model()
    batch = make_batch(MIXED_PROMPTS)
    right_padded = PromptBatch(batch.input_ids.flip(1), batch.attention_mask.flip(1), batch.position_ids.flip(2),
                               batch.pixel_values, batch.image_grid_thw, batch.prompt_lengths)  # fmt: skip
    with pytest.raises(ValueError, match="LEFT padded"):
        generate(model, right_padded, 1, max_new_tokens=2)
    with pytest.raises(ValueError, match="torch.Generator"):
        Engine(model, PAD).generate(batch, 1, SamplingParams(max_new_tokens=2), None)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="tokenizer and checkpoint do not match"):
        Engine(model, PAD).generate(batch, 1, SamplingParams(max_new_tokens=2, greedy=True, vocab_size=10**6), None)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_greedy_tokens():
    model = make_model()
    batch = make_batch(MIXED_PROMPTS)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    eager = Engine(model, PAD).generate(batch, 2, params, None)
    compiled = Engine(model, PAD, compile=True).generate(batch, 2, params, None)
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-5)


# --------------------------------------------------------------------------- CUDA-graph buckets (captured on GPU only)


def test_graph_buckets_reused_across_calls_give_the_same_rollouts():
    """cuda_graphs=True off CUDA runs the buckets' static buffers without capture. Prompts of two lengths fall in
    one bucket (slots round up to 64): each call must equal a fresh engine's rollout, so nothing of the previous
    call (its longer prompt's valid slots, its generated tokens) leaks into the next."""
    model = make_model()
    longer = make_batch(MIXED_PROMPTS, seed=2)
    shorter = make_batch([(3, None), (9, (1, 4, 4)), (4, None)], seed=3)
    sampled = SamplingParams(max_new_tokens=7, temperature=0.9, banned_token_ids=(IMAGE,))
    greedy = SamplingParams(max_new_tokens=5, greedy=True)
    engine = Engine(model, PAD, cuda_graphs=True)
    for batch, params in [(longer, sampled), (shorter, sampled), (longer, greedy), (shorter, sampled)]:
        got = engine.generate(batch, 2, params, torch.Generator().manual_seed(7))
        want = Engine(model, PAD).generate(batch, 2, params, torch.Generator().manual_seed(7))
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5)
    # One bucket per sampling setting; both share the generated keys/values (6 rows x 64 slots).
    assert len(engine.graphs.buckets) == 2 and len(engine.graphs.generated) == 1
    first, second = engine.graphs.buckets.values()
    assert first.cache.layers[0][0] is second.cache.layers[0][0]
    assert first.cache.prompt_len == 64 and first.cache.valid.shape == (6, 64)
