import math

import pytest
import torch

from modelyard.engine.sampler import Sampler, apply_top_k_top_p, mix_seed
from modelyard.engine.types import SamplingParams

V = 50


def _logits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 3


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = _logits(5)
    logits[2] = 0.0
    logits[2, 7] = logits[2, 9] = 1.0
    out = Sampler()(logits, [SamplingParams()] * 5, [0] * 5, [0] * 5)
    assert out == logits.argmax(-1).tolist() and out[2] == 7


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    sampler = Sampler()
    p = SamplingParams(temperature=1.0, seed=123)
    row = _logits(1, seed=1)
    alone = [sampler(row, [p], [123], [i])[0] for i in range(20)]
    for trial in range(3):
        batch = torch.cat([_logits(3, seed=10 + trial), row, _logits(4, seed=20 + trial)])
        params = [SamplingParams(temperature=0.7, top_k=5)] * 3 + [p] + [SamplingParams()] * 4
        seeds = [trial * 10 + j for j in range(3)] + [123] + [0] * 4
        got = [sampler(batch, params, seeds, [i] * 8)[3] for i in range(20)]
        assert got == alone
    other_seed = [sampler(row, [p], [124], [i])[0] for i in range(20)]
    assert other_seed != alone


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    n = 4000
    counts = torch.zeros(4)
    for i in range(n):
        counts[Sampler()(logits, [SamplingParams(temperature=1.0)], [7], [i])[0]] += 1
    freq = counts / n
    assert torch.allclose(freq, probs, atol=4 * math.sqrt(0.25 / n) + 0.005), freq


def test_top_k_and_top_p_restrict_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    s = Sampler()

    def support(params):
        return {s(logits, [params], [0], [i])[0] for i in range(300)}

    assert support(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert support(SamplingParams(temperature=1.0, top_k=1)) == {0}
    assert support(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert support(SamplingParams(temperature=1.0, top_p=0.1)) == {0}


def test_low_temperature_approaches_greedy():
    logits = _logits(6, seed=3)
    params = [SamplingParams(temperature=1e-4)] * 6
    assert Sampler()(logits, params, list(range(6)), [0] * 6) == logits.argmax(-1).tolist()


def test_top_k_top_p_mask_keeps_best_token():
    x = _logits(4, seed=5)
    out = apply_top_k_top_p(x, torch.tensor([0, 3, 1, 0]), torch.tensor([1.0, 1.0, 1.0, 1e-6]))
    assert torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).sum() == 3
    assert torch.isfinite(out[2]).sum() == 1 and out[2].argmax() == x[2].argmax()
    assert torch.isfinite(out[3]).sum() == 1 and out[3].argmax() == x[3].argmax()
    kept = torch.isfinite(out[1])
    assert torch.equal(out[1][kept], x[1][kept])


def test_mix_seed_spreads_and_rejects_mismatched_inputs():
    vals = {mix_seed(s, i) for s in range(30) for i in range(30)}
    assert len(vals) == 900 and all(0 <= v < 2**63 for v in vals)
    with pytest.raises(ValueError):
        Sampler()(_logits(2), [SamplingParams()], [0, 0], [0, 0])
