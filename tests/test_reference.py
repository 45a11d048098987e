"""The spec checked against itself: the written-out A/B-only backward equals autograd of the full fine-tuning path
(float64), and the grouped reference equals a per-token loop of single-adapter references."""

import torch

from conftest import rel_error
from lora_kernels import reference


def _leaves(*tensors):
    return [t.clone().to(torch.float64).requires_grad_(True) for t in tensors]


def test_ab_only_backward_equals_full_finetune_autograd():
    m, k, n, r, scaling = 7, 13, 11, 4, 0.75
    x, weight, lora_a, lora_b = _leaves(torch.randn(m, k), torch.randn(n, k), torch.randn(r, k), torch.randn(n, r))
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(m, n, dtype=torch.float64)
    y = reference.full_finetune_linear(x, weight, lora_a, lora_b, scaling, bias)
    y.backward(dy)
    grads = reference.lora_linear_backward(dy, x.detach(), weight.detach(), lora_a.detach(), lora_b.detach(), scaling)
    for name, leaf in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        assert rel_error(grads[name], leaf.grad) < 1e-12, name
    assert rel_error(reference.lora_linear(x, weight, lora_a, lora_b, scaling, bias), y) < 1e-12


def test_backward_with_dropout_matches_autograd():
    m, k, n, r, scaling, p = 6, 9, 5, 3, 2.0, 0.3
    x, weight, lora_a, lora_b = _leaves(torch.randn(m, k), torch.randn(n, k), torch.randn(r, k), torch.randn(n, r))
    mask = (torch.rand(m, k) >= p).to(torch.float64) / (1 - p)
    dy = torch.randn(m, n, dtype=torch.float64)
    reference.lora_linear(x, weight, lora_a, lora_b, scaling, None, mask).backward(dy)
    grads = reference.lora_linear_backward(dy, x.detach(), weight.detach(), lora_a.detach(), lora_b.detach(),
                                           scaling, mask)
    for name, leaf in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        assert rel_error(grads[name], leaf.grad) < 1e-12, name


def test_grouped_reference_is_a_loop_of_single_adapters():
    m, k, n, slots, max_rank = 9, 6, 5, 3, 4
    ranks = torch.tensor([4, 1, 2])
    scalings = torch.tensor([0.5, 2.0, -1.0])
    x, weight = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    lora_a = torch.randn(slots, max_rank, k, dtype=torch.float64)
    lora_b = torch.randn(slots, n, max_rank, dtype=torch.float64)
    for slot in range(slots):  # padding past each rank must never be read
        lora_a[slot, ranks[slot]:] = float("nan")
        lora_b[slot, :, ranks[slot]:] = float("nan")
    ids = torch.tensor([2, -1, 0, 0, 1, -1, 2, 1, 0])
    y = reference.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks)
    for t in range(m):
        slot = int(ids[t])
        if slot < 0:
            expected = x[t] @ weight.T
        else:
            rank = int(ranks[slot])
            expected = reference.lora_linear(x[t:t + 1], weight, lora_a[slot, :rank], lora_b[slot, :, :rank],
                                             float(scalings[slot]))[0]
        assert rel_error(y[t], expected) < 1e-12, t
    autograd_y = reference.multi_lora_linear_autograd(x, weight, lora_a, lora_b, ids, scalings, ranks=ranks)
    assert rel_error(autograd_y, y) < 1e-12
    # ranks=None: every slot at R
    full_a, full_b, full_ranks = lora_a.nan_to_num(1.0), lora_b.nan_to_num(1.0), torch.full((slots,), max_rank)
    expected = reference.multi_lora_linear(x, weight, full_a, full_b, ids, scalings, ranks=full_ranks)
    assert rel_error(reference.multi_lora_linear(x, weight, full_a, full_b, ids, scalings), expected) < 1e-12
    assert rel_error(reference.multi_lora_linear_autograd(x, weight, full_a, full_b, ids, scalings), expected) < 1e-12


def test_add_lora_slices_fill_their_column_ranges():
    m, k, slots, max_rank = 5, 4, 2, 3
    widths = (4, 2, 3)
    ids = torch.tensor([0, 1, -1, 1, 0])
    ranks, scalings = torch.tensor([3, 2]), torch.tensor([1.0, 0.5])
    x = torch.randn(m, k, dtype=torch.float64)
    y = torch.randn(m, sum(widths), dtype=torch.float64)
    lora_as = [torch.randn(slots, max_rank, k, dtype=torch.float64) for _ in widths]
    lora_bs = [torch.randn(slots, w, max_rank, dtype=torch.float64) for w in widths]
    out = reference.add_lora(y, x, lora_as, lora_bs, ids, scalings, ranks, widths)
    offset = 0
    for lora_a, lora_b, width in zip(lora_as, lora_bs, widths):
        shrunk = reference.lora_shrink(x, lora_a, ids, scalings, ranks)
        expected = reference.lora_expand(shrunk, lora_b, ids, torch.zeros(m, width, dtype=torch.float64), 0, ranks)
        assert rel_error(out[:, offset:offset + width] - y[:, offset:offset + width], expected) < 1e-12
        offset += width
    assert torch.equal(out[2], y[2])  # the -1 token is untouched


def test_grouped_references_add_the_bias_and_their_shrink_expand_follow_the_rules_alone():
    """The grouped oracles checked against the single-adapter one with a bias (no kernel test passed
    multi_lora_linear one), and lora_shrink / lora_expand each against their documented rules, not only composed
    (where shrink's zero rows and columns hid expand's, and the reverse)."""
    m, k, n, slots, max_rank = 6, 5, 4, 3, 4
    ranks, scalings = torch.tensor([4, 1, 2]), torch.tensor([0.5, 2.0, -1.0])
    x, weight = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    lora_a = torch.randn(slots, max_rank, k, dtype=torch.float64)
    lora_b = torch.randn(slots, n, max_rank, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 1, -1, 0])
    for oracle in (reference.multi_lora_linear, reference.multi_lora_linear_autograd):
        y = oracle(x, weight, lora_a, lora_b, ids, scalings, bias, ranks)
        for t in range(m):
            slot, rank = int(ids[t]), int(ranks[max(int(ids[t]), 0)])
            expected = x[t] @ weight.T + bias if slot < 0 else reference.lora_linear(
                x[t:t + 1], weight, lora_a[slot, :rank], lora_b[slot, :, :rank], float(scalings[slot]), bias)[0]
            assert rel_error(y[t], expected) < 1e-12, (oracle.__name__, t)
    shrunk = reference.lora_shrink(x, lora_a, ids, scalings, ranks)
    for t in range(m):
        slot = int(ids[t])
        if slot < 0:
            assert torch.equal(shrunk[t], torch.zeros(max_rank, dtype=torch.float64)), t  # not slot 0's
            continue
        rank = int(ranks[slot])
        assert rel_error(shrunk[t, :rank], float(scalings[slot]) * (lora_a[slot, :rank] @ x[t])) < 1e-12, t
        assert torch.equal(shrunk[t, rank:], torch.zeros(max_rank - rank, dtype=torch.float64)), t  # past the rank
    t_in = torch.randn(m, max_rank, dtype=torch.float64)  # every entry set: -1 rows and past-rank columns too
    out = torch.randn(m, n + 3, dtype=torch.float64)
    expanded = reference.lora_expand(t_in, lora_b, ids, out, 2, ranks)
    for t in range(m):
        slot = int(ids[t])
        expected = out[t].clone()
        if slot >= 0:
            rank = int(ranks[slot])
            expected[2:2 + n] += lora_b[slot, :, :rank] @ t_in[t, :rank]
        assert rel_error(expanded[t], expected) < 1e-12, t
