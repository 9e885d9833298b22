"""The CUDA path: the engine on a GPU in fp32 and bf16, eager, compiled and replayed from CUDA graphs, and a GRPO
loss step under bf16 autocast. Skipped without a GPU (CI has none); run on one with `pytest tests/test_cuda.py`.

fp32 comparisons disable TF32 so that a GPU matmul rounds like the CPU one up to summation order.
"""

import copy
import functools
import warnings

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vlaa_min.config import ModelConfig
from vlaa_min.generate import Engine, SamplingParams
from vlaa_min.grpo_loss import group_advantages, policy_loss
from vlaa_min.infra.runtime import autocast
from vlaa_min.logprobs import completion_logprobs
from vlaa_min.model import VLModel
from tests import test_generate
from tests.helpers import randomize_
from tests.test_generate import IMAGE, MIXED_PROMPTS, PAD, VOCAB, logprobs_by_forward, make_batch, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


generate = functools.partial(test_generate.generate, device=CUDA)


def test_greedy_on_gpu_equals_greedy_on_cpu_and_transformers_on_gpu(tmp_path):
    model = VLModel(ModelConfig.tiny("qwen2_5_vl", vocab_size=VOCAB)).eval()
    randomize_(model, seed=1)
    model.save_pretrained(tmp_path)
    batch = make_batch(MIXED_PROMPTS, seed=1)
    on_cpu = Engine(model, PAD).generate(batch, 1, SamplingParams(max_new_tokens=10, greedy=True), None)
    on_gpu = generate(model.to(CUDA), batch, 1, max_new_tokens=10, greedy=True)
    assert torch.equal(on_gpu.completion_ids.cpu(), on_cpu.completion_ids)
    assert torch.allclose(on_gpu.logprobs.cpu(), on_cpu.logprobs, atol=1e-4)

    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").to(CUDA).eval()
    theirs.generation_config.eos_token_id = None
    batch = batch.to(CUDA)
    with torch.no_grad():
        reference = theirs.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                                    mm_token_type_ids=(batch.input_ids == IMAGE).long(),
                                    pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                    do_sample=False, max_new_tokens=10, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(on_gpu.completion_ids, reference[:, batch.input_ids.shape[1] :])


def test_gpu_sampling_is_seeded_and_rows_of_a_group_differ():
    model = make_model().to(CUDA)
    batch = make_batch(MIXED_PROMPTS)
    first = generate(model, batch, 8, seed=3, max_new_tokens=6)
    again = generate(model, batch, 8, seed=3, max_new_tokens=6)
    assert torch.equal(first.completion_ids, again.completion_ids)
    for group in first.completion_ids[:, 0].view(len(MIXED_PROMPTS), 8):
        assert group.unique().numel() > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_engine_matches_eager_on_gpu(dtype):
    model = make_model().to(CUDA, dtype)
    batch = make_batch(MIXED_PROMPTS)
    eager = generate(model, batch, 2, max_new_tokens=8, greedy=True)
    compiled = generate(model, batch, 2, max_new_tokens=8, greedy=True, compile=True)
    # bf16: Inductor fuses and reorders differently from eager, so the logits may differ by a rounding step and
    # a near-tie could flip; the first tokens must agree and the log-probs stay within bf16's resolution.
    if dtype == torch.float32:
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
        tolerance = 1e-4
    else:
        assert torch.equal(compiled.completion_ids[:, :2], eager.completion_ids[:, :2])
        tolerance = 5e-2
    agree = (compiled.completion_ids == eager.completion_ids).cumprod(dim=1).bool()  # up to the first difference
    assert torch.allclose(compiled.logprobs[agree], eager.logprobs[agree], atol=tolerance)


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_match_eager_token_for_token(compile):
    """The decode step replayed from CUDA graphs (eager or compiled kernels) against the eager engine, fp32, greedy
    and seeded sampling; one engine serves prompts of two lengths from one recorded bucket."""
    model = make_model().to(CUDA)
    longer, shorter = make_batch(MIXED_PROMPTS, seed=2), make_batch([(3, None), (9, (1, 4, 4)), (4, None)], seed=3)
    engine = Engine(model, PAD, compile=compile, cuda_graphs=True)
    cases = [(longer, dict(max_new_tokens=10, greedy=True)), (longer, dict(max_new_tokens=12, temperature=0.9)),
             (shorter, dict(max_new_tokens=12, temperature=0.9, banned_token_ids=(IMAGE,))),
             (shorter, dict(max_new_tokens=10, greedy=True))]  # fmt: skip
    for batch, params in cases:
        graphed = engine.generate(batch.to(CUDA), 2, SamplingParams(**params), torch.Generator(CUDA).manual_seed(5))
        eager = generate(model, batch, 2, seed=5, **params)
        assert torch.equal(graphed.completion_ids, eager.completion_ids)
        assert torch.allclose(graphed.logprobs, eager.logprobs, atol=1e-4)
    assert all(bucket.graph is not None for bucket in engine.graphs.buckets.values())
    assert len(engine.graphs.buckets) == 3  # greedy, sampled, sampled with a banned token


def test_cuda_graphs_in_bf16_follow_the_compiled_step():
    model = make_model().to(CUDA, torch.bfloat16)
    batch = make_batch(MIXED_PROMPTS)
    compiled = generate(model, batch, 2, max_new_tokens=8, greedy=True, compile=True)
    graphed = generate(model, batch, 2, max_new_tokens=8, greedy=True, compile=True, cuda_graphs=True)
    # Larger buckets change a reduction's length, so bf16 rounding may flip a near-tie later on (as in
    # test_compiled_engine_matches_eager_on_gpu): the first tokens agree, the log-probs within bf16's resolution.
    assert torch.equal(graphed.completion_ids[:, :2], compiled.completion_ids[:, :2])
    agree = (graphed.completion_ids == compiled.completion_ids).cumprod(dim=1).bool()
    assert torch.allclose(graphed.logprobs[agree], compiled.logprobs[agree], atol=5e-2)


def test_bf16_logprobs_are_as_close_to_fp32_as_a_bf16_forward_pass():
    model = make_model(bias={1: 3.0}).to(CUDA)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = make_batch(MIXED_PROMPTS, seed=4)
    rollout = generate(model_bf16, batch, 3, seed=5, max_new_tokens=12, temperature=0.8, stop_token_ids=(1,))
    rollout = rollout.to("cpu")  # the reference passes run on the CPU
    exact = logprobs_by_forward(model.cpu(), batch, rollout, 3, 0.8)  # fp32: the reference
    forward_bf16 = logprobs_by_forward(model_bf16.cpu(), batch, rollout, 3, 0.8)
    # The engine (cached, grouped decode) rounds in other places than one uncached forward pass, but in bf16 as
    # well: its error must be of the same size as that pass's own, not beyond.
    engine_error = (rollout.logprobs - exact).abs().max()
    forward_error = (forward_bf16.float() - exact).abs().max()
    assert 0 < forward_error < 1
    assert engine_error <= 2 * forward_error, (engine_error, forward_error)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_decode_loop_syncs_the_host_only_every_sync_every_steps(cuda_graphs):
    model = make_model().to(CUDA)
    batch = make_batch(MIXED_PROMPTS)

    def count_syncs(max_new_tokens):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, batch, 2, max_new_tokens=max_new_tokens, cuda_graphs=cuda_graphs)
                torch.ones(1, device=CUDA).item()  # a known sync: the counter must see it
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(warning.message) for warning in caught)

    short, long = count_syncs(8), count_syncs(64)
    assert short >= 1
    assert long - short <= (64 - 8) // 8  # one "all done?" check per 8 extra steps, nothing per token


def test_grpo_loss_backward_under_bf16_autocast():
    model = make_model().to(CUDA).train()  # fp32 master weights, bf16 matmuls
    batch = make_batch(MIXED_PROMPTS).to(CUDA)
    rollout = generate(model.eval(), batch, 4, max_new_tokens=6)
    # The engine runs in inference mode; its outputs enter autograd as copies (the trainer indexes them likewise).
    completion_ids, lengths, old_logp, prompt_rows = (t.clone() for t in (
        rollout.completion_ids, rollout.completion_lengths, rollout.logprobs, rollout.prompt_index))
    with autocast(CUDA, torch.bfloat16):
        logp, _ = completion_logprobs(model.train(), batch, completion_ids, lengths, 1.0,
                                      prompt_rows=prompt_rows)  # fmt: skip
    mask = torch.arange(logp.shape[1], device=CUDA)[None, :] < lengths[:, None]
    assert (logp.float() - old_logp).abs()[mask].max() < 0.1  # fp32 sampling vs a bf16-autocast re-score
    rewards = torch.rand(len(MIXED_PROMPTS), 4, device=CUDA)
    advantages = group_advantages(rewards).flatten()  # (N,), row p*G + g
    loss, _ = policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2,
                          aggregation="seq-mean-token-mean", normaliser=float(len(advantages)))  # fmt: skip
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
