"""The spec: every op of design.md in obvious PyTorch, computed in float64 by default. It is the oracle every
backend is tested against, and `full_finetune_linear` is the full fine-tuning oracle (W trainable) the tests compare
the A/B-only backward with.

Shapes (PEFT layout): x [M, K], weight [N, K], bias [N], lora_a [r, K], lora_b [N, r]; grouped ops stack L slots:
lora_a [L, R, K], lora_b [L, N, R], scalings [L], ranks [L], adapter_ids [M] in [-1, L) (an id outside counts as
-1, base model only, as every backend treats an unchecked one).
`dropout_mask` is the multiplier applied to the LoRA branch input: 0 for dropped elements, 1/(1-p) elsewhere.
"""

import torch


def _as(t, dtype):
    return None if t is None else t.to(dtype)


def _slot(adapter_ids, token, num_slots):
    """Token's slot, -1 for an id outside [0, num_slots) (a LoRABatch built by hand is not checked on every backend:
    an IndexError here, where the others add nothing)."""
    slot = int(adapter_ids[token])
    return slot if 0 <= slot < num_slots else -1


def lora_linear(x, weight, lora_a, lora_b, scaling=1.0, bias=None, dropout_mask=None, dtype=torch.float64):
    """y = x @ W.T + scaling * (drop(x) @ A.T) @ B.T + bias, for x of any leading dims [..., K]."""
    x, weight, lora_a, lora_b, bias = (_as(t, dtype) for t in (x, weight, lora_a, lora_b, bias))
    x_lora = x if dropout_mask is None else x * dropout_mask.to(dtype)
    y = x @ weight.T + scaling * ((x_lora @ lora_a.T) @ lora_b.T)
    return y if bias is None else y + bias


def lora_linear_backward(dy, x, weight, lora_a, lora_b, scaling=1.0, dropout_mask=None, dtype=torch.float64):
    """The A/B-only backward of design.md §2 written out, for x [M, K] and dy [M, N]:
        S = drop(x) A^T;  dB = s dY^T S;  dS = s dY B;  dA = dS^T drop(x);  dX = dY W + drop'(dS A)
    plus what full fine-tuning adds: dW = dY^T x, and d_bias = sum of dY over tokens."""
    dy, x, weight, lora_a, lora_b = (_as(t, dtype) for t in (dy, x, weight, lora_a, lora_b))
    mask = None if dropout_mask is None else dropout_mask.to(dtype)
    x_lora = x if mask is None else x * mask
    s = x_lora @ lora_a.T
    d_lora_b = scaling * dy.T @ s
    ds = scaling * dy @ lora_b
    d_lora_a = ds.T @ x_lora
    dx_lora = ds @ lora_a
    dx = dy @ weight + (dx_lora if mask is None else dx_lora * mask)
    return {"x": dx, "lora_a": d_lora_a, "lora_b": d_lora_b, "weight": dy.T @ x, "bias": dy.sum(0)}


def full_finetune_linear(x, weight, lora_a, lora_b, scaling=1.0, bias=None):
    """The merged layer y = F.linear(x, W + s·B·A, bias). Differentiated by autograd (with every argument a leaf
    that requires grad) it gives the full fine-tuning gradients, dW included; dA and dB equal the A/B-only ones."""
    return torch.nn.functional.linear(x, weight + scaling * (lora_b @ lora_a), bias)


def lora_shrink(x, lora_a, adapter_ids, scalings, ranks, dtype=torch.float64):
    """out[t, :ranks[i]] = scalings[i] * A[i, :ranks[i]] @ x[t] with i = adapter_ids[t] >= 0; zero elsewhere.
    x [M, K], lora_a [L, R, K] -> out [M, R]. Entries of A past ranks[i] are never read."""
    num_tokens, max_rank = x.shape[0], lora_a.shape[1]
    out = torch.zeros(num_tokens, max_rank, dtype=dtype, device=x.device)
    for t in range(num_tokens):
        slot = _slot(adapter_ids, t, lora_a.shape[0])
        if slot < 0:
            continue
        rank = int(ranks[slot])
        out[t, :rank] = float(scalings[slot]) * (lora_a[slot, :rank].to(dtype) @ x[t].to(dtype))
    return out


def lora_expand(t, lora_b, adapter_ids, out, slice_offset, ranks, dtype=torch.float64):
    """Returns out (as dtype) with out[t, off:off+N] += B[i, :, :ranks[i]] @ t[t, :ranks[i]] for
    i = adapter_ids[t] >= 0. t [M, R], lora_b [L, N, R], out [M, N_total]."""
    out = out.to(dtype).clone()
    width = lora_b.shape[1]
    for token in range(t.shape[0]):
        slot = _slot(adapter_ids, token, lora_b.shape[0])
        if slot < 0:
            continue
        rank = int(ranks[slot])
        out[token, slice_offset:slice_offset + width] += lora_b[slot, :, :rank].to(dtype) @ t[token, :rank].to(dtype)
    return out


def add_lora(y, x, lora_a_slices, lora_b_slices, adapter_ids, scalings, ranks, output_slices, dtype=torch.float64):
    """For each output slice j of width output_slices[j] (consecutive column ranges of y), adds the grouped LoRA of
    (lora_a_slices[j] [L, R_j, K], lora_b_slices[j] [L, n_j, R_j]) to those columns. ranks: one [L] tensor for every
    slice, or a list of S such tensors (one per slice). Returns the result as dtype."""
    per_slice = isinstance(ranks, (list, tuple)) and all(isinstance(r, torch.Tensor) for r in ranks)
    out = y.to(dtype).clone()
    offset = 0
    for j, (lora_a, lora_b, width) in enumerate(zip(lora_a_slices, lora_b_slices, output_slices)):
        if lora_b.shape[1] != width:
            raise ValueError(f"reference.add_lora: lora_b_slices[{j}] expected {width} rows (output_slices[{j}]), "
                             f"got shape {tuple(lora_b.shape)}")
        ranks_j = ranks[j] if per_slice else ranks
        shrunk = lora_shrink(x, lora_a, adapter_ids, scalings, ranks_j, dtype)
        out = lora_expand(shrunk, lora_b, adapter_ids, out, offset, ranks_j, dtype)
        offset += width
    return out


def multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scalings, bias=None, ranks=None, dtype=torch.float64):
    """y[t] = x[t] @ W.T + bias + scalings[i] * B[i, :, :r_i] @ (A[i, :r_i] @ x[t]) for i = adapter_ids[t] >= 0.
    x [..., K] with adapter_ids shaped like x.shape[:-1]; ranks default to R for every slot."""
    lead = x.shape[:-1]
    x2 = x.flatten(0, -2) if x.dim() > 1 else x[None]  # reshape(-1, K) cannot infer M when K is 0
    ids = adapter_ids.reshape(-1)
    if ranks is None:
        ranks = torch.full((lora_a.shape[0],), lora_a.shape[1])
    y = x2.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        y = y + bias.to(dtype)
    shrunk = lora_shrink(x2, lora_a, ids, scalings, ranks, dtype)
    y = lora_expand(shrunk, lora_b, ids, y, 0, ranks, dtype)
    return y.reshape(*lead, weight.shape[0])


def multi_lora_linear_autograd(x, weight, lora_a, lora_b, adapter_ids, scalings, bias=None, ranks=None):
    """Differentiable version of `multi_lora_linear` in the inputs' dtype (use float64 leaves): the oracle for the
    gradients of x and of every slot's A and B. Only entries within each slot's rank get gradient."""
    lead = x.shape[:-1]
    x2 = x.flatten(0, -2) if x.dim() > 1 else x[None]  # reshape(-1, K) cannot infer M when K is 0
    ids = adapter_ids.reshape(-1)
    num_slots, max_rank = lora_a.shape[0], lora_a.shape[1]
    if ranks is None:
        ranks = torch.full((num_slots,), max_rank)
    y = x2 @ weight.T
    if bias is not None:
        y = y + bias
    rows = []
    for t in range(x2.shape[0]):
        slot = _slot(ids, t, num_slots)
        # A token without an adapter adds a rank-0 product: zeros that read no entry of A or B, but keep them in the
        # graph (zeros_like did not: with no adapter token in the batch, A and B got no gradient, and backward
        # raised "does not require grad" when only they required it, where every other backend gives zeros).
        rank, scaling = (0, 1.0) if slot < 0 else (int(ranks[slot]), float(scalings[slot]))
        slot = max(slot, 0)  # not slot 0's scaling: an unchecked inf there (CUDA tensors) would give 0·inf = NaN
        rows.append(scaling * (lora_b[slot, :, :rank] @ (lora_a[slot, :rank] @ x2[t])))
    y = y + (torch.stack(rows) if rows else (x2 @ lora_a[0, :0].T) @ lora_b[0, :, :0].T)  # no tokens: [0, N]
    return y.reshape(*lead, weight.shape[0])
