"""The rollout engine: batched sampling of G completions per prompt with a static KV cache.

GRPO spends most of its time here, so the engine does the minimum per generated token:
1. Prefill each prompt ONCE (its images encoded once) into a KV cache of B x T_prompt slots. Prompts are left
   padded, so every prompt's next-token logits are `lm_head(hidden[:, -1])` (the head runs on that column only).
2. Hand the prompt cache and those logits to the G sample rows of each prompt (row = p * G + g). A
   `GroupedKVCache` keeps the prompt's keys/values once, plus max_new_tokens slots per row. Every row draws its
   OWN first token: drawing it before the hand-over would start all G samples of a group identically.
3. Decode with fixed shapes: one token per row per step at the row's slot `step`, position next_position + step
   on all three MRoPE axes. Finished rows are fed the pad token, with log-prob 0. The host checks "all rows
   done" only every `sync_every` steps, so the loop never waits on the device for a single token.
Sampling (sample_tokens): logits / temperature, top-k, top-p, one inverse-CDF draw per row; the returned
log-probs are those of the unfiltered softmax(logits / temperature), what GRPO's ratio needs.

The paper samples G = 4 rollouts per prompt at temperature 0.8 (the caller's SamplingParams). Deviations from
transformers' generate: no repetition penalty, beam search or min_new_tokens; stopping is by stop token ids or
max_new_tokens only; completions are trimmed to the longest row. `compile=True` wraps the decode step in
torch.compile (one graph for all steps); tests run eager. `cuda_graphs=True` (GPU) records the step as a CUDA graph
per shape bucket and replays it with one launch per token (vlaa_min/infra/decode_graphs.py).

Usage:
    engine = Engine(model, pad_token_id=processor.pad_token_id)         # on GPU: compile=True, cuda_graphs=True
    params = SamplingParams(max_new_tokens=512, temperature=0.8, stop_token_ids=(im_end_id, endoftext_id))
    rollout = engine.generate(batch, num_samples=4, params=params,
                              generator=torch.Generator(device).manual_seed(0))
    rollout.completion_ids   # (B*G, L), row p*G+g is sample g of prompt p
"""

from dataclasses import dataclass, fields, replace

import torch

from vlaa_min.cache import GroupedKVCache, KVCache
from vlaa_min.infra.decode_graphs import SLOT_MULTIPLE, Bucket, DecodeGraphs, round_up
from vlaa_min.model import VLModel
from vlaa_min.rope import next_position_ids

# With compile=True the prompt cache length is rounded up to a multiple of this, so that prompts of varying length
# reuse a handful of compiled decode graphs instead of recompiling for every batch.
COMPILED_CACHE_MULTIPLE = SLOT_MULTIPLE


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()  # e.g. (<|im_end|>, <|endoftext|>); included in the completion
    # Never sampled, e.g. <|image_pad|>: a generated image placeholder could not be re-scored by a forward pass
    # (the model would look for an image to put there). Log-probs stay those of the unfiltered distribution.
    banned_token_ids: tuple[int, ...] = ()
    # Ids at or past it are never sampled (0 = no limit): Qwen pads its 151,665 tokens to 151,936 embedding rows,
    # and the rows past the tokenizer decode to nothing. Processor.vocab_size gives it.
    vocab_size: int = 0

    @classmethod
    def for_processor(cls, processor, **settings) -> "SamplingParams":
        """`settings` plus what the tokenizer fixes: its stop ids, the vision placeholders (banned) and its size."""
        return cls(stop_token_ids=processor.stop_token_ids, banned_token_ids=processor.vision_token_ids,
                   vocab_size=processor.vocab_size, **settings)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(
                f"SamplingParams.temperature must be > 0 (greedy=True for argmax), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.vocab_size < 0:
            raise ValueError(f"SamplingParams.vocab_size must be >= 0 (0 = no limit), got {self.vocab_size}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "banned_token_ids", tuple(int(i) for i in self.banned_token_ids))


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # (N, L) long, pad_token_id after each row's end
    completion_lengths: torch.Tensor  # (N,) long, the stop token included
    finished_by_stop: torch.Tensor  # (N,) bool: ended with a stop token (else cut at max_new_tokens)
    finish_reasons: list[str]  # N x "stop" | "length"
    logprobs: torch.Tensor  # (N, L) float32, log p(token) under softmax(logits / T); 0 past the end
    prompt_index: torch.Tensor  # (N,) long, row p * G + g -> p

    def to(self, device) -> "Rollout":
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "finish_reasons"}
        return replace(self, **{name: tensor.to(device) for name, tensor in tensors.items()})


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One Rollout of the prompts of `parts` in order (engine calls over consecutive prompt chunks): rows padded to
    the widest part, prompt_index continued."""
    width = max(part.completion_ids.shape[1] for part in parts)

    def pad(tensor: torch.Tensor, value: float) -> torch.Tensor:  # (n, l) -> (n, width)
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    offsets = torch.tensor([0] + [int(part.prompt_index.max()) + 1 for part in parts[:-1]]).cumsum(0)
    return Rollout(
        completion_ids=torch.cat([pad(part.completion_ids, pad_token_id) for part in parts]),
        completion_lengths=torch.cat([part.completion_lengths for part in parts]),
        finished_by_stop=torch.cat([part.finished_by_stop for part in parts]),
        finish_reasons=[reason for part in parts for reason in part.finish_reasons],
        logprobs=torch.cat([pad(part.logprobs, 0.0) for part in parts]),
        prompt_index=torch.cat([part.prompt_index + offset for part, offset in zip(parts, offsets.tolist())]),
    )


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of temperature-scaled logits (N, V): removed tokens get -inf.

    Top-k keeps every token tied with the k-th largest logit.
    """
    if top_k > 0 and top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (N, 1)
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (N, V)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        # Keep a token while the more likely ones hold less than top_p; the most likely token always stays.
        remove_sorted = mass_before >= top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)  # back to vocabulary order
        scaled = scaled.masked_fill(remove, float("-inf"))
    return scaled


def inverse_cdf_sample(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row (N,) of weights (N, V) >= 0, in proportion to them, using uniform (N,) in [0, 1)."""
    return draw_from_cdf(weights.cumsum(dim=-1), uniform)


def draw_from_cdf(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row (N,) given the cumulative sums (N, V) of non-negative weights and uniform (N,) in [0, 1).

    The threshold (1 - U) * total lies in (0, total], so the first index whose cumulative sum reaches it
    always has positive probability (a zero-probability token never adds to the sum), and the total is the
    cumulative sum's own last entry, so rounding in the sum cannot push the threshold past the end. (Over Qwen's
    151,936 entries the float32 sum stays within 1e-7 of a float64 one on CPU: each token's chance is off by less.)
    NaN weights (a model whose weights blew up) reach no entry: the last token is drawn, with a NaN log-prob for the
    caller to see (train_grpo stops on it), instead of an index past the end.
    """
    threshold = (1.0 - uniform) * cdf[:, -1]  # (N,)
    return torch.searchsorted(cdf, threshold[:, None]).squeeze(1).clamp(max=cdf.shape[-1] - 1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None, banned: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (N,) and their log-probs (N,) float32 under the unfiltered softmax(logits / temperature).

    uniform: (N,) Uniform[0, 1) draws, one per row (ignored when greedy). One number per row, not one per
    vocabulary entry as Gumbel-max needs; the caller draws them from its torch.Generator outside the (optionally
    compiled) step, so the same seed gives the same samples and the step stays a pure fixed-shape function.
    banned: params.banned_token_ids as a long tensor on the logits' device, made once by the caller so that a
    step copies nothing from the host (None: made here).
    With top_p = 1 and top_k = 0 the log-probs are those of the distribution sampled from (what a later forward
    pass at the same temperature recomputes); with top-k / top-p they are not renormalised over the kept tokens.
    A (N, V) pass over Qwen's 151,936 entries costs about as much as a decoder layer's matmuls at N = 64, so
    plain sampling makes four (max, exp, cumulative sum, the search) and reads the normaliser off the sum.
    """
    scaled = logits.float()  # (N, V)
    if params.temperature != 1.0:
        scaled = scaled / params.temperature
    top = scaled.amax(dim=-1, keepdim=True)  # (N, 1)
    weights = torch.exp(scaled - top)  # (N, V): softmax(scaled) before its division
    allowed = scaled
    if params.banned_token_ids:
        if banned is None:
            banned = scaled.new_tensor(params.banned_token_ids, dtype=torch.long)
        allowed = scaled.index_fill(1, banned, float("-inf"))
    vocab = params.vocab_size if 0 < params.vocab_size < scaled.shape[-1] else scaled.shape[-1]
    if not params.greedy and allowed is scaled and params.top_k == 0 and params.top_p == 1.0:
        cdf = weights[:, :vocab].cumsum(dim=-1)  # (N, vocab): the rows past the tokenizer are never drawn
        tokens, total = draw_from_cdf(cdf, uniform), cdf[:, -1] + weights[:, vocab:].sum(dim=-1)
    else:
        allowed = allowed[:, :vocab]
        if params.greedy:
            tokens = allowed.argmax(dim=-1)
        else:
            tokens = inverse_cdf_sample(torch.exp(filter_logits(allowed, params.top_k, params.top_p) - top), uniform)
        total = weights.sum(dim=-1)
    chosen = scaled.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen - top.squeeze(1) - total.log()


class Engine:
    """Samples G completions per prompt from a VLModel; see the module docstring."""

    def __init__(self, model: VLModel, pad_token_id: int, compile: bool = False, sync_every: int = 8,
                 cuda_graphs: bool = False):  # fmt: skip
        if sync_every < 1:
            raise ValueError(f"Engine.sync_every must be >= 1, got {sync_every}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.sync_every = sync_every
        self.compiled = compile
        # The decode step has fixed shapes, so one compiled graph serves every step of a generate call. On CPU the
        # C++ wrapper calls the step's kernels without a Python round trip each (docs/speed.md has what that
        # saves); on GPU the default Python wrapper is kept (CUDA graphs remove its launches).
        on_cpu = model.lm_head.weight.device.type == "cpu"
        options = {"cpp_wrapper": True} if on_cpu else None
        self._step = torch.compile(self._decode_step, dynamic=False, options=options) if compile else self._decode_step
        # Off CUDA the buckets run without capture: the same buffers and shapes, which the CPU tests check.
        self.graphs = DecodeGraphs(self._step, capture=not on_cpu) if cuda_graphs else None

    def _decode_step(self, tokens, position_ids, cache_position, cache, uniform, params, banned=None):
        """Feed one token per row (N,) at cache slot cache_position (1,) -> next tokens (N,), their log-probs (N,)."""
        logits = self.model(tokens[:, None], position_ids, past=cache, cache_position=cache_position)  # (N, 1, V)
        return sample_tokens(logits[:, -1], params, uniform, banned)

    def _prefill(self, input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, num_samples, max_new,
                 bucket: Bucket | None = None):  # fmt: skip
        """Run each prompt (and its images) once and hand it to its G sample rows (row p*G + g).

        Returns the decode cache (GroupedKVCache: the prompts' keys/values once, max_new generated slots per row;
        a CUDA-graph bucket's own cache when given), each row's first-token logits (N, V) and the position id of
        its first generated token (N,).
        """
        prompt_count, prompt_len = input_ids.shape
        if bucket is not None:
            cache = bucket.start()
        else:
            prompt_slots = round_up(prompt_len, COMPILED_CACHE_MULTIPLE) if self.compiled else prompt_len
            cache = KVCache.for_model(self.model, prompt_count, prompt_slots)
        hidden = self.model(
            input_ids,
            position_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            past=cache,
            cache_position=torch.arange(prompt_len, device=input_ids.device),
            return_hidden=True,
        )  # (B, T, D)
        first_logits = self.model.lm_head(hidden[:, -1])  # (B, V): left padding puts every last token in column T-1
        # Each row draws its own first token from these logits (the caller); the prompt's keys/values stay one copy.
        cache = bucket.cache if bucket is not None else GroupedKVCache(cache, num_samples, max_new)
        first_logits = first_logits.repeat_interleave(num_samples, dim=0)  # (N, V)
        next_position = next_position_ids(position_ids, attention_mask).repeat_interleave(num_samples)  # (N,)
        return cache, first_logits, next_position

    @torch.inference_mode()
    def generate(
        self, batch, num_samples: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Rollout:
        """Sample `num_samples` completions for each prompt of a left-padded prompt batch.

        batch: input_ids (B, T), attention_mask (B, T) bool, position_ids (3, B, T), pixel_values,
        image_grid_thw -- a PromptBatch from Processor.collate_prompts. generator: the source of every
        random draw, on the model's device (may be None only with greedy=True).
        """
        device = self.model.lm_head.weight.device
        if params.vocab_size > self.model.lm_head.weight.shape[0]:
            raise ValueError(f"Engine.generate: the tokenizer has {params.vocab_size} tokens but the model only "
                             f"{self.model.lm_head.weight.shape[0]} embedding rows: tokenizer and checkpoint do not "
                             f"match")
        if num_samples < 1:
            raise ValueError(f"Engine.generate: num_samples must be >= 1, got {num_samples}")
        if not params.greedy and (generator is None or generator.device.type != device.type):
            where = None if generator is None else generator.device
            raise ValueError(f"Engine.generate: sampling needs a torch.Generator on {device}, got {where}")
        input_ids = batch.input_ids.to(device)  # (B, T)
        attention_mask = batch.attention_mask.to(device=device, dtype=torch.bool)  # (B, T)
        position_ids = batch.position_ids.to(device)  # (3, B, T)
        pixel_values = None if batch.pixel_values is None else batch.pixel_values.to(device)
        image_grid_thw = None if batch.image_grid_thw is None else batch.image_grid_thw.to(device)
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"Engine.generate: batch.input_ids {tuple(input_ids.shape)} and batch.attention_mask "
                f"{tuple(attention_mask.shape)} must be the same (B, T)"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Engine.generate: prompts must be LEFT padded (every row's last column a real token)")

        prompt_count, max_new = input_ids.shape[0], params.max_new_tokens
        rows = prompt_count * num_samples
        bucket = None
        if self.graphs is not None:
            bucket = self.graphs.bucket(self.model, prompt_count, num_samples, input_ids.shape[1], params)
        # --- prefill each prompt once; its G rows each draw their own first token below
        cache, first_logits, next_position = self._prefill(
            input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, num_samples, max_new, bucket
        )
        # Generated tokens are text: the same position on all three MRoPE axes, one more per step.
        step_positions = (next_position[:, None] + torch.arange(max_new, device=device)).expand(3, -1, -1)  # (3,N,L)
        cache_positions = torch.arange(cache.prompt_len, cache.prompt_len + max_new, device=device)  # (L,)
        banned = None
        if params.banned_token_ids:
            banned = torch.tensor(params.banned_token_ids, dtype=torch.long, device=device)

        def decode_step(tokens, position_ids, cache_position, uniform):
            if bucket is not None:
                return bucket.step(tokens, position_ids, cache_position, uniform)
            return self._step(tokens, position_ids, cache_position, cache, uniform, params, banned)

        completion_ids = torch.full((rows, max_new), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        uniform = None if params.greedy else torch.empty(rows, dtype=torch.float32, device=device)

        # --- decode: step s records token s, then feeds it to get token s + 1
        if uniform is not None:
            uniform.uniform_(generator=generator)
        tokens, token_logprobs = sample_tokens(first_logits, params, uniform, banned)
        for step in range(max_new):
            tokens = tokens.masked_fill(done, self.pad_token_id)  # finished rows are fed the pad token
            completion_ids[:, step] = tokens
            logprobs[:, step] = token_logprobs.masked_fill(done, 0.0)
            lengths += ~done
            hit_stop = torch.isin(tokens, stop_ids) & ~done
            stopped |= hit_stop
            done |= hit_stop
            # The only host sync of the loop, every sync_every steps.
            if step == max_new - 1 or ((step + 1) % self.sync_every == 0 and bool(done.all())):
                break
            if uniform is not None:
                uniform.uniform_(generator=generator)
            tokens, token_logprobs = decode_step(
                tokens, step_positions[:, :, step : step + 1], cache_positions[step : step + 1], uniform
            )

        longest = int(lengths.max())
        return Rollout(
            completion_ids=completion_ids[:, :longest],
            completion_lengths=lengths,
            finished_by_stop=stopped,
            finish_reasons=["stop" if hit else "length" for hit in stopped.tolist()],
            logprobs=logprobs[:, :longest],
            prompt_index=torch.arange(prompt_count, device=device).repeat_interleave(num_samples),
        )
