"""Shared-prefix packing: layout, prediction indices and masks against constructions written
out independently (by hand, or by brute force over every token pair)."""

import random

import pytest
import torch
from helpers import random_groups

from vrpo_fast.packing import bucket_width, pack_groups, row_padding, trainer_budget


def test_layout_by_hand():
    prompts = [[10, 11, 12], [20]]
    responses = [[[30, 31], [40]], [[50], [60, 61, 62]]]
    b = pack_groups(prompts, responses)
    assert b.input_ids.tolist() == [[10, 11, 12, 30, 31, 40, 20, 50, 60, 61, 62]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2, 3]]
    assert b.group.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    assert b.response.tolist() == [[-1, -1, -1, 0, 0, 1, -1, 0, 1, 1, 1]]
    # 30 and 40 are both predicted by the last prompt token (12, index 2); 31 by 30; ...
    assert b.targets.tolist() == [30, 31, 40, 50, 60, 61, 62]
    assert b.pred_index.tolist() == [2, 3, 2, 6, 6, 8, 9]
    assert b.segment_ids.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert b.last_index.tolist() == [4, 5, 7, 10]
    assert [tuple(s) for s in b.spans] == [(0, 0, 0, 3, 5), (0, 0, 1, 5, 6), (0, 1, 0, 7, 8),
                                           (0, 1, 1, 8, 11)]
    assert [tuple(s) for s in b.prompt_spans] == [(0, 0, -1, 0, 3), (0, 1, -1, 6, 7)]
    assert (b.num_groups, b.group_size, b.num_tokens, b.max_length) == (2, 2, 11, 5)
    m = b.dense_mask()
    assert m.shape == (1, 1, 11, 11) and m.dtype == torch.bool
    visible = {q: [k for k in range(11) if m[0, 0, q, k]] for q in range(11)}
    assert visible[4] == [0, 1, 2, 3, 4]        # 31 sees the prompt, 30 and itself
    assert visible[5] == [0, 1, 2, 5]           # 40 sees the prompt and itself, not 30, 31
    assert visible[6] == [6]                    # group 1's prompt never sees group 0
    assert visible[7] == [6, 7]
    assert visible[10] == [6, 8, 9, 10]


def test_budget_rows_and_padding_by_hand():
    prompts = [[10, 11, 12], [20]]
    responses = [[[30, 31], [40]], [[50], [60, 61, 62]]]
    b = pack_groups(prompts, responses, max_tokens=6, pad_id=7, pad_to_multiple=4)
    assert b.input_ids.tolist() == [[10, 11, 12, 30, 31, 40, 7, 7],
                                    [20, 50, 60, 61, 62, 7, 7, 7]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 0], [0, 1, 1, 2, 3, 0, 0, 0]]
    assert b.group[:, -1].tolist() == [-1, -1]
    assert b.pred_index.tolist() == [2, 3, 2, 8, 8, 10, 11]
    assert b.last_index.tolist() == [4, 5, 9, 12]
    m = b.dense_mask()[:, 0]
    assert m[0, 6].nonzero().flatten().tolist() == [6]          # a pad sees only itself
    assert not m[0, :6, 6:].any() and not m[1, :5, 5:].any()    # no real token sees a pad


def brute_force_mask(b, sliding_window=None):
    """Who may attend to whom, token pair by token pair, from the packed metadata."""
    R, T = b.shape
    g, r, p = b.group.tolist(), b.response.tolist(), b.position_ids.tolist()
    out = torch.zeros(R, T, T, dtype=torch.bool)
    for row in range(R):
        for q in range(T):
            for k in range(T):
                if q == k:
                    out[row, q, k] = True
                    continue
                same = g[row][q] >= 0 and g[row][q] == g[row][k] and k < q
                visible = r[row][k] == -1 or r[row][k] == r[row][q]
                near = sliding_window is None or p[row][q] - p[row][k] < sliding_window
                out[row, q, k] = same and visible and near
    return out


@pytest.mark.parametrize("G, K, budget, multiple, buckets", [
    (1, 2, None, 1, False), (5, 4, 48, 1, False), (7, 6, 90, 8, False), (4, 3, 200, 16, False),
    (5, 4, None, 8, True), (7, 6, 90, 8, True), (4, 3, 200, 16, True)])
def test_random_packing_reproduces_every_sequence(G, K, budget, multiple, buckets):
    rng = random.Random(G * 100 + K)
    prompts, responses = random_groups(G, K, rng)
    responses[0][K - 1] = [5]                                    # a one-token response
    b = pack_groups(prompts, responses, max_tokens=budget, pad_id=1, pad_to_multiple=multiple,
                    bucket_widths=buckets)
    R, T = b.shape
    sizes = [len(p) + sum(map(len, rs)) for p, rs in zip(prompts, responses)]
    longest_row = int((b.group >= 0).sum(1).max())
    assert T % multiple == 0 and T >= longest_row
    if buckets:       # a width of the series multiple x {1, 2, 3, 4, 6, ...}, or the budget's
        series = [multiple * m for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)]
        capped = -(-budget // multiple) * multiple if budget else None
        assert T == min(w for w in series + [capped] if w and w >= longest_row)
    else:
        assert T == -(-longest_row // multiple) * multiple
    assert b.num_tokens == sum(sizes) == int((b.group >= 0).sum())
    assert ((b.input_ids == 1) | (b.group >= 0)).all()           # pads hold pad_id
    ids, pos = b.input_ids.flatten().tolist(), b.position_ids.flatten().tolist()
    grp, rsp = b.group.flatten().tolist(), b.response.flatten().tolist()
    rows_of_group = {}
    for row in range(R):
        in_row = {grp[row * T + c] for c in range(T)} - {-1}
        if budget is not None:
            assert sum(sizes[g] for g in in_row) <= budget
        for g in in_row:
            rows_of_group.setdefault(g, []).append(row)
    assert rows_of_group == {g: [rows_of_group[g][0]] for g in range(G)}   # one row each
    # Walk the expected tokens (g, k, t) in order and check each against the packed rows.
    n = 0
    for g, (prompt, group) in enumerate(zip(prompts, responses)):
        row = rows_of_group[g][0]
        cols = [c for c in range(T) if grp[row * T + c] == g and rsp[row * T + c] == -1]
        assert tuple(b.prompt_spans[g]) == (row, g, -1, cols[0], cols[-1] + 1)
        assert [ids[row * T + c] for c in cols] == prompt
        assert [pos[row * T + c] for c in cols] == list(range(len(prompt)))
        last_prompt = row * T + cols[-1]
        for k, resp in enumerate(group):
            span = b.spans[g * K + k]
            assert (span.row, span.group, span.response) == (row, g, k)
            flat = list(range(row * T + span.start, row * T + span.end))
            assert [ids[f] for f in flat] == resp
            assert [pos[f] for f in flat] == list(range(len(prompt), len(prompt) + len(resp)))
            assert all(grp[f] == g and rsp[f] == k for f in flat)
            assert b.last_index[g * K + k] == flat[-1]
            for t, token in enumerate(resp):
                assert b.targets[n] == token and b.segment_ids[n] == g * K + k
                assert b.pred_index[n] == (last_prompt if t == 0 else flat[t - 1])
                n += 1
    assert n == len(b.targets) == len(b.pred_index) == len(b.segment_ids)
    assert b.max_length == max(len(p) + max(map(len, rs)) for p, rs in zip(prompts, responses))
    assert torch.equal(b.dense_mask()[:, 0], brute_force_mask(b))


def test_budget_packs_several_groups_per_row_and_several_rows():
    prompts = [[3] * 4 for _ in range(6)]
    responses = [[[4] * 3, [5] * 3] for _ in range(6)]           # 10 tokens per group
    assert pack_groups(prompts, responses, max_tokens=60).shape == (1, 60)
    assert pack_groups(prompts, responses, max_tokens=20).shape == (3, 20)
    assert pack_groups(prompts, responses, max_tokens=10).shape == (6, 10)
    assert pack_groups(prompts, responses, max_tokens=25).shape == (3, 20)


def test_sliding_window_mask_matches_brute_force():
    rng = random.Random(9)
    prompts, responses = random_groups(3, 3, rng, prompt=(2, 9), resp=(1, 8))
    b = pack_groups(prompts, responses, max_tokens=40)
    for window in (1, 3, 5):
        assert torch.equal(b.dense_mask(sliding_window=window)[:, 0],
                           brute_force_mask(b, sliding_window=window))


def test_block_mask_equals_dense_mask_at_token_and_block_level():
    pytest.importorskip("torch.nn.attention.flex_attention")
    rng = random.Random(5)
    prompts, responses = random_groups(5, 3, rng, prompt=(3, 30), resp=(1, 20))
    b = pack_groups(prompts, responses, max_tokens=160)
    R, T = b.shape
    assert R > 1
    for window in (None, 7):
        bm = b.block_mask(sliding_window=window)
        dense = b.dense_mask(sliding_window=window)[:, 0]
        q = torch.arange(T)[:, None].expand(T, T)
        kv = torch.arange(T)[None, :].expand(T, T)
        for row in range(R):
            from_mod = bm.mask_mod(torch.full_like(q, row), torch.zeros_like(q), q, kv)
            assert torch.equal(from_mod, dense[row])
        # Block sparsity: a (q, kv) block is computed iff some pair in it may attend.
        Bq, Bk = bm.BLOCK_SIZE
        nq, nk = -(-T // Bq), -(-T // Bk)
        padded = torch.zeros(R, nq * Bq, nk * Bk, dtype=torch.bool)
        padded[:, :T, :T] = dense
        any_in_block = padded.view(R, nq, Bq, nk, Bk).any(dim=(2, 4))
        assert torch.equal(bm.to_dense()[:, 0].bool(), any_in_block)


def test_tensor_and_numpy_ids_pack_like_lists():
    np = pytest.importorskip("numpy")
    want = pack_groups([[3, 4], [5]], [[[6], [7, 8]], [[9, 10], [11]]], max_tokens=6)
    got = pack_groups([torch.tensor([3, 4]), np.array([5])],
                      [[torch.tensor([6]), [np.int64(7), 8]], [np.array([9, 10]), (11,)]],
                      max_tokens=6)
    for name, value in vars(want).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(got, name), value), name
        else:
            assert getattr(got, name) == value, name


def test_masks_are_built_once_per_batch_window_and_device(monkeypatch):
    """The policy, reference and auxiliary model of a step attend through one mask: a second
    request returns the stored mask; another window or a moved batch builds its own."""
    rng = random.Random(2)
    b = pack_groups(*random_groups(3, 2, rng, prompt=(2, 9), resp=(1, 8)), max_tokens=40)
    built = []
    build = type(b)._dense_mask
    monkeypatch.setattr(type(b), "_dense_mask", lambda self, w: built.append(w) or build(self, w))
    first = b.dense_mask()
    assert b.dense_mask() is first and built == [None]
    assert torch.equal(b.dense_mask(sliding_window=3)[:, 0], brute_force_mask(b, sliding_window=3))
    assert built == [None, 3]
    moved = b.to("cpu")
    assert torch.equal(moved.dense_mask(), first) and built == [None, 3, None]


def test_trainer_budget_is_one_row_unless_set():
    """Neither the cascade attention (CPU) nor FlexAttention (CUDA) pays for pairs between
    groups: one row, no tail padding, unless train.max_tokens says otherwise."""
    prompts = [[3] * 4, [3] * 9, [3] * 2]
    responses = [[[4] * 3, [5] * 1], [[4] * 2, [5] * 2], [[4] * 6, [5] * 6]]   # 8, 13, 14 tokens
    for device in ("cpu", "cuda"):
        assert trainer_budget(None, device, prompts, responses) is None
        assert trainer_budget(40, device, prompts, responses) == 40
    b = pack_groups(prompts, responses, max_tokens=trainer_budget(None, "cpu", prompts,
                                                                   responses))
    assert b.shape == (1, 35) and bool((b.group >= 0).all())
    # The dense mask pays for every pair of its row: rows of at most the longest group.
    assert trainer_budget(None, "cpu", prompts, responses, "sdpa") == 14
    assert trainer_budget(40, "cpu", prompts, responses, "sdpa") == 40
    assert trainer_budget(None, "cuda", prompts, responses, "flash") is None


def test_row_segments_walk_each_row_as_the_token_tensors_describe_it():
    prompts, responses = random_groups(5, 3, random.Random(12))
    b = pack_groups(prompts, responses, max_tokens=60, pad_to_multiple=16)
    rows = b.row_segments()
    assert len(rows) == b.shape[0] and b.row_segments() is rows           # built once
    for r, segments in enumerate(rows):
        col = 0
        for i, seg in enumerate(segments):
            group = b.group[r, col:col + seg.length]
            response = b.response[r, col:col + seg.length]
            assert len(set(group.tolist())) == 1 and len(set(response.tolist())) == 1
            if seg.pad:
                assert group[0] == -1 and i == len(segments) - 1
            elif seg.prompt < 0:
                assert group[0] >= 0 and response[0] == -1
            else:
                assert response[0] >= 0 and not segments[seg.prompt].pad
                start = sum(s.length for s in segments[:seg.prompt])
                assert b.group[r, start] == group[0] and b.response[r, start] == -1
            col += seg.length
        assert col == b.shape[1]
    assert sum(not s.pad and s.prompt >= 0 for row in rows for s in row) == 5 * 3


def test_to_moves_every_tensor():
    b = pack_groups([[3, 4]], [[[5], [6, 7]]]).to("meta")
    assert all(t.device.type == "meta" for t in vars(b).values() if isinstance(t, torch.Tensor))
    assert b.num_groups == 1 and len(b.spans) == 2


def test_errors_name_the_group_index_or_budget():
    ok_p, ok_r = [[1], [2]], [[[3], [4]], [[5], [6]]]
    with pytest.raises(ValueError, match=r"group 1: 9 tokens .* max_tokens = 8"):
        pack_groups([[1], [1, 2, 3]], [[[4], [5]], [[4, 4, 4], [5, 5, 5]]], max_tokens=8)
    with pytest.raises(ValueError, match=r"response_ids\[1\]\[0\]: empty"):
        pack_groups(ok_p, [[[3], [4]], [[], [4]]])
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]: empty prompt"):
        pack_groups([[1], []], ok_r)
    with pytest.raises(ValueError, match=r"response_ids\[1\]: 1 responses, but group 0 has 2"):
        pack_groups(ok_p, [[[3], [4]], [[5]]])
    with pytest.raises(ValueError, match=r"prompt_ids has 2 groups but response_ids has 1"):
        pack_groups(ok_p, ok_r[:1])
    with pytest.raises(ValueError, match=r"prompt_ids: no groups"):
        pack_groups([], [])
    with pytest.raises(ValueError, match=r"response_ids\[0\]\[1\]: token id 9 outside the "
                                         r"vocabulary \[0, 9\) \(at position 1\)"):
        pack_groups(ok_p, [[[3], [4, 9]], [[5], [6]]], vocab_size=9)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\]: token id -1 outside"):
        pack_groups([[-1], [2]], ok_r)
    with pytest.raises(ValueError, match=r"response_ids\[0\]\[0\]: expected a flat list of "
                                         r"integer token ids"):
        pack_groups(ok_p, [[[3.5], [4]], [[5], [6]]])
    with pytest.raises(ValueError, match=r"prompt_ids\[0\]: expected a list, got int"):
        pack_groups([1, 2], ok_r)
    with pytest.raises(ValueError, match=r"response_ids\[1\]\[0\]: expected a flat list of "
                                         r"integer token ids"):
        pack_groups(ok_p, [[[3], [4]], [["a"], [6]]])
    with pytest.raises(ValueError, match=r"max_tokens: expected a positive int"):
        pack_groups(ok_p, ok_r, max_tokens=0)
    with pytest.raises(ValueError, match=r"pad_to_multiple: expected a positive int"):
        pack_groups(ok_p, ok_r, pad_to_multiple=0)


def test_bucket_width_is_the_next_width_of_the_series():
    series = sorted({m * 2 ** k for m in (1, 3) for k in range(12)})
    for multiple in (1, 128):
        for tokens in range(1, 3000):
            want = multiple * next(w for w in series if w * multiple >= tokens)
            assert bucket_width(tokens, multiple) == want, (tokens, multiple)


def test_bucketed_widths_of_a_run_are_few():
    """Micro-batches of 16 HH-sized groups under a 16k budget (the 0.5B config) need dozens
    of 128-multiples of width; with buckets a handful (transformers recompiles FlexAttention
    per shape and gives up after 8)."""
    rng = random.Random(0)
    shapes = {False: set(), True: set()}
    for _ in range(60):
        lengths = [(rng.randint(20, 500), [rng.randint(5, 256) for _ in range(6)])
                   for _ in range(16)]
        prompts = [[3] * p for p, _ in lengths]
        responses = [[[4] * n for n in rs] for _, rs in lengths]
        for buckets in shapes:
            b = pack_groups(prompts, responses, max_tokens=16384, pad_to_multiple=128,
                            bucket_widths=buckets)
            assert b.shape[1] <= 16384
            shapes[buckets].add(b.shape)
    assert len(shapes[False]) > 16 and len(shapes[True]) <= 4


def test_row_padding_per_device_and_attention():
    assert row_padding("cpu") == {} == row_padding("cpu", "flex")
    # Only FlexAttention's compiled kernel wants whole blocks and few widths.
    assert row_padding("cuda", "flash") == {} == row_padding("cuda", "cascade")
    assert row_padding("cuda", "flex") == row_padding("cuda")
    cuda = row_padding("cuda")
    b = pack_groups([[3, 4]], [[[5], [6, 7]]], **cuda)
    assert b.shape == (1, 128)
    b = pack_groups([[3] * 100], [[[5] * 100, [6] * 100]], **cuda)
    assert b.shape == (1, 384)
