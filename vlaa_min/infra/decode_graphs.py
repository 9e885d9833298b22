"""The engine's decode step as CUDA graphs: captured once per shape bucket, replayed for every step of every call.

A decode step of a 3B model is some hundreds of small kernels for a few rows; launched one by one from Python,
the launches take longer than the GPU's work. A CUDA graph records the kernels once and replays them all with
one launch. A graph replays on the memory it was recorded with, so everything the step reads or writes lives in
buffers that belong to it: the prompts' cache, the generated keys/values, the step's inputs and outputs.

Buckets: prompt lengths and max_new_tokens change from call to call. The prompt cache's slots and the generated
slots are rounded up to a multiple of SLOT_MULTIPLE, so a few graphs serve every call: one per (prompts, G,
prompt slots, generated slots, sampling settings). Unused slots stay invalid (masked), so a bucket computes
exactly what a cache of the exact size would. The generated keys/values (N rows x generated slots x every layer)
are the large part; buckets with the same N and generated slots share one set (only one graph runs at a time),
and their graphs share one memory pool for the same reason.

Off CUDA (the tests' CPU) the same buckets and buffers run the step directly, without capture; tests/test_cuda.py
checks the captured graphs against eager token for token on a GPU.
"""

from dataclasses import replace

import torch

from vlaa_min.cache import GroupedKVCache, KVCache

SLOT_MULTIPLE = 64
# Eager calls before a capture: the first compiles (with torch.compile) and sets up cuBLAS; none of that may
# happen while a graph records.
WARMUP_CALLS = 2


def round_up(length: int, multiple: int = SLOT_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


class Bucket:
    """One shape bucket: its prompt cache, decode cache, static step inputs and (on CUDA) the captured graph."""

    def __init__(self, step, cache: GroupedKVCache, params, banned: torch.Tensor | None, capture: bool, pool):
        self.step_fn, self.cache, self.params, self.banned = step, cache, params, banned
        self.capture, self.pool = capture, pool
        rows, device = cache.valid.shape[0], cache.valid.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # (N,)
        self.position_ids = torch.zeros(3, rows, 1, dtype=torch.long, device=device)  # (3, N, 1)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.uniform = torch.zeros(rows, dtype=torch.float32, device=device)  # (N,)
        self.graph, self.outputs = None, None

    def start(self) -> KVCache:
        """Before a call's prefill: no slot of the previous call stays valid. Returns the cache to prefill."""
        self.cache.prompt.valid.zero_()
        self.cache.valid.zero_()
        return self.cache.prompt

    def _call(self):
        uniform = None if self.params.greedy else self.uniform
        return self.step_fn(self.tokens, self.position_ids, self.cache_position, self.cache, uniform, self.params,
                            self.banned)  # fmt: skip

    def step(self, tokens, position_ids, cache_position, uniform):
        """The decode step on this bucket's buffers -> next tokens (N,), log-probs (N,).

        On CUDA the outputs are the graph's own tensors, overwritten by the next replay: use them before it.
        """
        self.tokens.copy_(tokens)
        self.position_ids.copy_(position_ids)
        self.cache_position.copy_(cache_position)
        if uniform is not None:
            self.uniform.copy_(uniform)
        if not self.capture:
            return self._call()
        if self.graph is None:
            self._record()  # its warm-up calls run this step for real: writing a step's slot twice is harmless
        self.graph.replay()
        return self.outputs

    def _record(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._call()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.outputs = self._call()


class DecodeGraphs:
    """The buckets of one Engine; `bucket(...)` finds or makes the one for a call's shapes."""

    def __init__(self, step, capture: bool):
        self.step, self.capture = step, capture
        self.buckets: dict[tuple, Bucket] = {}
        self.generated: dict[tuple[int, int], tuple] = {}  # (rows, slots) -> (per-layer (k, v), valid)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, model, prompts: int, group: int, prompt_len: int, params) -> Bucket:
        prompt_slots, new_slots = round_up(prompt_len), round_up(params.max_new_tokens)
        params = replace(params, max_new_tokens=new_slots)  # the step does not depend on max_new_tokens
        key = (prompts, group, prompt_slots, params)
        if key not in self.buckets:
            prompt = KVCache.for_model(model, prompts, prompt_slots)
            shared = (prompts * group, new_slots)
            if shared not in self.generated:
                self.generated[shared] = GroupedKVCache.allocate_generated(prompt, group, new_slots)
            cache = GroupedKVCache(prompt, group, new_slots, generated=self.generated[shared])
            banned = None
            if params.banned_token_ids:
                banned = torch.tensor(params.banned_token_ids, dtype=torch.long, device=prompt.k.device)
            self.buckets[key] = Bucket(self.step, cache, params, banned, self.capture, self.pool)
        return self.buckets[key]

    def clear(self) -> None:
        """Free every bucket's buffers and graphs (the next call records again)."""
        self.buckets.clear()
        self.generated.clear()
