"""Chunked log-probs equal the plain full-vocabulary computation, values and gradients."""

import pytest
import torch

from vlaa_min.logprobs import sequence_logprobs


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_logprobs_match_full_softmax_values_and_grads(chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    temperature = 0.7

    logp, entropy = sequence_logprobs(hidden, ids, mask, head, temperature, chunk_size, with_entropy=True)
    (logp.sum()).backward()
    grad_chunked = hidden.grad.clone()
    hidden.grad = None

    full = torch.log_softmax(head(hidden).float() / temperature, dim=-1)  # (B, T, V)
    reference = full[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2) * mask[:, 1:]
    reference_entropy = -(full.exp() * full).sum(-1)[:, :-1] * mask[:, 1:]
    reference.sum().backward()
    assert torch.allclose(logp[:, 1:], reference, atol=1e-6)
    assert (logp[:, 0] == 0).all() and (logp[~mask] == 0).all()
    assert torch.allclose(entropy[:, 1:], reference_entropy, atol=1e-5)
    assert torch.allclose(grad_chunked, hidden.grad, atol=1e-6)
