"""The backends of the pipeline's model steps (2-5), behind one small interface.

    complete(requests) -> (index, ChatResult) pairs, as the requests finish, in any order

A ChatRequest is one chat turn (optional system prompt, user text, at most one image file); a ChatResult is the
reply, or the error that stopped it. This file holds the interface and the local backend (our engine on a local
checkpoint); pipeline/openai_http.py holds the backend for OpenAI-compatible servers.

The local backend folds a step's system prompt into the user turn: Processor.encode_prompt always uses the
paper's VL-Thinking system prompt.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image


class PipelineError(ValueError):
    """Bad input to a step: the message names the file, line, record and field."""


class BackendError(RuntimeError):
    """A backend that cannot work at all (wrong URL, key or model); the step stops."""



@dataclass(frozen=True)
class ChatRequest:
    """One chat turn: an optional system prompt, the user's text and at most one image (a file path)."""

    user: str
    system: str | None = None
    image: str | None = None
    max_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy


@dataclass
class ChatResult:
    text: str | None = None  # the reply; None when the request failed
    reasoning: str | None = None  # a reasoning model's separate thinking (OpenAI-compatible servers only)
    truncated: bool = False  # cut at max_tokens
    error: str | None = None


class Backend(Protocol):
    def complete(self, requests: list[ChatRequest]) -> Iterator[tuple[int, ChatResult]]:
        """Answer every request; yields (index into requests, result) as they finish, in any order."""


class LocalBackend:
    """Our generation engine on a local checkpoint (the toy model or a real Qwen2-VL / Qwen2.5-VL).

    The checkpoint is loaded on the first request, so a rerun with nothing left to do loads nothing."""

    def __init__(self, checkpoint: str, *, device: str = "auto", precision: str = "auto", batch_size: int = 8,
                 seed: int = 0):
        if not (Path(checkpoint) / "config.json").is_file():
            raise PipelineError(f"local backend: {checkpoint}/config.json not found (expected a checkpoint folder)")
        self.checkpoint, self.device_name, self.precision_name = checkpoint, device, precision
        self.batch_size, self.seed = batch_size, seed
        self.model = None

    def _load(self) -> None:
        import torch  # here, so that the HTTP backend runs without loading torch

        from vlaa_min.generate import Engine
        from vlaa_min.model import VLModel
        from vlaa_min.processor import Processor
        from vlaa_min.infra.runtime import resolve_device, resolve_dtype

        self.device = resolve_device(self.device_name)
        self.precision = resolve_dtype(self.precision_name, self.device)
        self.processor = Processor.from_pretrained(self.checkpoint)
        weights_dtype = torch.float32 if self.device.type == "cpu" else self.precision
        self.model = VLModel.from_pretrained(self.checkpoint, dtype=weights_dtype, device=self.device).eval()
        self.engine = Engine(self.model, pad_token_id=self.processor.pad_token_id)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)

    def _encode(self, request: ChatRequest):
        text = f"{request.system}\n\n{request.user}" if request.system else request.user
        images = []
        if request.image:
            with Image.open(request.image) as image:
                images.append(image.convert("RGB"))
        return self.processor.encode_prompt(text, images)

    def complete(self, requests: list[ChatRequest]) -> Iterator[tuple[int, ChatResult]]:
        from vlaa_min.generate import SamplingParams
        from vlaa_min.infra.runtime import autocast

        if requests and self.model is None:
            self._load()
        # One SamplingParams per batch: group requests by their limits first.
        by_settings: dict[tuple[int, float], list[int]] = {}
        for index, request in enumerate(requests):
            by_settings.setdefault((request.max_tokens, request.temperature), []).append(index)
        for (max_tokens, temperature), indices in by_settings.items():
            params = SamplingParams.for_processor(self.processor, max_new_tokens=max_tokens,
                                                  temperature=temperature or 1.0, greedy=temperature == 0)
            for start in range(0, len(indices), self.batch_size):
                encoded, rows = [], []
                for index in indices[start : start + self.batch_size]:
                    try:
                        encoded.append(self._encode(requests[index]))
                        rows.append(index)
                    except (OSError, ValueError) as error:  # unreadable image, special-token text, ...
                        yield index, ChatResult(error=f"cannot encode the prompt: {error}")
                if not encoded:
                    continue
                batch = self.processor.collate_prompts(encoded).to(self.device)
                with autocast(self.device, self.precision):
                    rollout = self.engine.generate(batch, 1, params, self.generator)
                for row, index in enumerate(rows):
                    length = int(rollout.completion_lengths[row])
                    text = self.processor.decode(rollout.completion_ids[row, :length])
                    yield index, ChatResult(text=text, truncated=rollout.finish_reasons[row] == "length")


