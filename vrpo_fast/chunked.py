"""The PyTorch references of the fused kernels, used on the CPU and by the kernel tests and
benchmarks:

- `chunked_linear_logprobs`, of the fused linear log-prob (vrpo_fast.kernels.linear_logprob):
  the same maths in vocabulary chunks with an online log-sum-exp;
- `one_sweep_vrpo_loss`, of the one-sweep LM head + VRPO loss
  (vrpo_fast.kernels.fused_linear_vrpo): log-probs, loss and gradients per chunk of whole
  prompt groups, the loop shared by both paths (`linear_vrpo_sweep`, `TorchSweep`).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.autograd.function import once_differentiable

from vrpo_fast.objective import vrpo_loss


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """log p(target) = h.w_t / T - logsumexp_v(h.w_v / T), vocabulary streamed in chunks.

    Forward keeps a running max and sum per row (online log-sum-exp) and saves only the LSE (N,);
    backward recomputes each logit chunk: dlogits = g (onehot - softmax) / T. Nothing of size
    (N, V) is ever allocated: the largest temporaries are (N, chunk_size).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, num_segments, temperature,
                ignore_index, chunk_size):
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, torch.zeros_like(targets))
        h = hidden.float()
        hs = h / temperature if temperature != 1.0 else h         # logits = hs @ w.T
        running_max = torch.full((N,), float("-inf"), device=hidden.device)
        running_sum = torch.zeros(N, device=hidden.device)
        for v0 in range(0, V, chunk_size):
            logits = hs @ weight[v0:v0 + chunk_size].float().T
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            # In place on the chunk: one (N, chunk) temporary per chunk, not three.
            running_sum = running_sum * torch.exp(running_max - new_max) + \
                logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        target_logit = (hs * weight[tgt].float()).sum(dim=1)
        logp = torch.where(valid, target_logit - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, tgt, valid, lse, segment_ids)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.has_segments = segment_ids is not None
        if segment_ids is None:
            return logp
        return torch.zeros(num_segments, device=hidden.device).index_add_(0, segment_ids, logp)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, tgt, valid, lse, segment_ids = ctx.saved_tensors
        T, C = ctx.temperature, ctx.chunk_size
        g = grad_out.float()[segment_ids] if ctx.has_segments else grad_out.float()
        g = torch.where(valid, g, torch.zeros_like(g)) / T        # (N,)
        h = hidden.float()
        hs = h / T if T != 1.0 else h
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        neg_lse, neg_g = -lse[:, None], -g[:, None]
        for v0 in range(0, weight.shape[0], C):
            w = weight[v0:v0 + C].float()
            # -g softmax / T: the LSE shift rides in the GEMM (addmm), exp and scale in place.
            d_logits = torch.addmm(neg_lse, hs, w.T).exp_().mul_(neg_g)
            if grad_h is not None:
                grad_h.addmm_(d_logits, w)
            if grad_w is not None:
                grad_w[v0:v0 + C].addmm_(d_logits.T, h)
        # The one-hot part: + g / T at each row's target.
        if grad_h is not None:
            grad_h += g[:, None] * weight[tgt].float()
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w.index_add_(0, tgt, g[:, None] * h)
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            *, segment_ids: torch.Tensor | None = None,
                            num_segments: int | None = None, temperature: float = 1.0,
                            ignore_index: int = -100, chunk_size: int = 4096) -> torch.Tensor:
    """Per-token log p(target) (N,), or per-segment sums (num_segments,) with `segment_ids`.

    hidden: (N, D), weight: (V, D) (the LM head), targets: (N,) with `ignore_index` for positions
    that contribute nothing. fp32 accumulation for any input dtype; output float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got "
                         f"{tuple(targets.shape)}")
    if segment_ids is not None:
        if segment_ids.shape != targets.shape:
            raise ValueError(f"segment_ids: expected shape {tuple(targets.shape)}, got "
                             f"{tuple(segment_ids.shape)}")
        if num_segments is None:
            raise ValueError("num_segments: required with segment_ids")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    return _ChunkedLinearLogprobs.apply(hidden, weight, targets, segment_ids, num_segments,
                                        float(temperature), ignore_index, chunk_size)


# --- one sweep: log-probs, the VRPO loss and its gradients per chunk of whole groups ---------

# The CPU reference's fp32 logit buffer: about this many bytes per chunk.
SWEEP_CHUNK_BYTES = 64 * 2**20


class _Workspace:
    """The sweep's (rows, V) logit buffer, kept between sweeps on the CPU.

    The buffer is tens to hundreds of MiB. The CPU allocator maps a fresh one from the kernel
    every time and the first write faults it in page by page: a GEMM into a new 220 MiB buffer
    took ~1.4x the same GEMM into a reused one (~0.1 s per buffer at the benchmark's training
    shape). CUDA's caching allocator reuses its blocks by itself, so there `get` is a plain
    allocation. One buffer per dtype is kept, grown to the largest asked for; a sweep that
    starts while another holds it (another thread) gets a fresh allocation. `release()` frees
    what is kept.
    """

    def __init__(self):
        self._kept: dict[torch.dtype, torch.Tensor] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def get(self, rows: int, cols: int, dtype: torch.dtype, device):
        """Yields an uninitialised (rows, cols) tensor: a view of the kept buffer on the CPU."""
        if torch.device(device).type != "cpu" or not self._lock.acquire(blocking=False):
            yield torch.empty(rows, cols, dtype=dtype, device=device)
            return
        try:
            kept = self._kept.get(dtype)
            if kept is None or kept.numel() < rows * cols:
                self._kept.pop(dtype, None)                 # free the smaller one first
                kept = self._kept[dtype] = torch.empty(rows * cols, dtype=dtype)
            yield kept[:rows * cols].view(rows, cols)
        finally:
            self._lock.release()

    def release(self) -> None:
        """Free the kept buffers (the next CPU sweep allocates again)."""
        self._kept.clear()


workspace = _Workspace()


class TorchSweep:
    """The steps of `linear_vrpo_sweep` in PyTorch (the CPU path and the reference of
    `vrpo_fast.kernels.fused_linear_vrpo.TritonSweep`): fp32 GEMMs and buffer whatever the
    inputs' dtype; the buffer holds z / T, then softmax. The loss derivative comes from
    autograd through `vrpo_loss` on the (b, K) sequence log-probs of the chunk.

    On the CPU the passes over the (n, V) buffer run at memory speed, so they are kept to one:
    the fused softmax, in place. The target's log-prob is read back as log softmax_t, exact
    while softmax_t is a normal float; the rare row where it is below `TINY` (a target logit
    ~70 below the row's largest) gets its log-sum-exp from its logits recomputed alone. The
    gradient's coefficient c_n and one-hot never touch the buffer: they ride on the (n, D)
    sides of the two gradient GEMMs (`head_grads_`).
    """

    buffer_bytes = SWEEP_CHUNK_BYTES
    work = torch.float32
    TINY = 2.0**-100

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float,
                 ignore_index: int, **loss):
        self.weight = weight.float()
        self.temperature, self.ignore_index = temperature, ignore_index
        self.loss = loss            # beta, loss_type, estimator (none for `sweep_logprobs`)

    def logits(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """h: (n, D) -> out (n, V) = h W^T / T in fp32."""
        z = torch.mm(h.float(), self.weight.T, out=out)
        return z if self.temperature == 1.0 else z.div_(self.temperature)

    def lse_logp(self, z, targets, h=None):
        """In place: the chunk's z / T (n, V) -> softmax; returns (None: `head_grads_` needs
        only the buffer, logp (n,), 0 on ignored positions). h: the chunk's (n, D) hidden
        states, for the rows whose target probability is below TINY (the recompute)."""
        valid = targets != self.ignore_index
        index = torch.where(valid, targets, 0)[:, None]
        # softmax's fused CPU kernel, in place (each row is read before it is written, no
        # temporary): one read and one write of the buffer, which then holds what the
        # gradient needs.
        torch.softmax(z, dim=1, out=z)
        p = z.gather(1, index).squeeze(1)
        logp = torch.log(p)
        low = (valid & (p < self.TINY)).nonzero().squeeze(1)
        if low.numel():             # host sync: free on the CPU, where this class runs
            rows = h[low].float() @ self.weight.T / self.temperature
            logp[low] = rows.gather(1, index[low]).squeeze(1) - rows.logsumexp(1)
        return None, torch.where(valid, logp, 0.0)

    def head_grads_(self, z, targets, lse, coef, h, dh, dw):
        """z: the chunk's softmax (n, V) (lse_logp's); dLoss/dlogits_n = c_n (onehot(t_n) -
        softmax_n) with coef c (n,), 0 on ignored rows. Writes dH = dlogits W into dh (n, D)
        (when not None) and adds dlogits^T h to dw (V, D) (when not None), as

            dlogits W      = c * (W[t] - softmax W)
            dlogits^T h    = scatter_t(c h) - softmax^T (c h)

        so c and the one-hot touch only (n, D) tensors; z is left as it is."""
        index = torch.where(targets != self.ignore_index, targets, 0)
        c = coef[:, None]
        if dh is not None:
            torch.mm(z, self.weight, out=dh)
            dh.mul_(-c).addcmul_(self.weight[index], c)
        if dw is not None:
            ch = h.float() * c
            dw.addmm_(z.T, ch, alpha=-1.0).index_add_(0, index, ch)

    def loss_grad(self, policy, ref, g, grad_scale: float):
        """policy, ref: (b, K) fp32, g: (b, K / 2) -> (per-prompt loss (b,), grad_scale *
        dL_b / dpolicy (b, K))."""
        return reference_loss_grad(policy, ref, g, grad_scale, self.loss)


def reference_loss_grad(policy, ref, g, grad_scale: float, loss: dict, labelled=None,
                        label_scale=None):
    """The per-prompt losses of `vrpo_loss` (b,) and grad_scale * dL_b / dpolicy (b, K), by
    autograd through the reference formula on the (b, K) sequence log-probs: b x K numbers,
    exact for every option of the formula (labelled masks included), no host sync.
    loss: beta, loss_type, estimator."""
    with torch.enable_grad():
        p = policy.detach().requires_grad_(True)
        per, _ = vrpo_loss(p, ref, g, reduction="none", check_inputs=False, labelled=labelled,
                           label_scale=label_scale, **loss)
        (dp,) = torch.autograd.grad(per, p, torch.full_like(per, grad_scale))
    return per.detach(), dp


def group_offsets(segment_ids: torch.Tensor, num_groups: int,
                  group_size: int) -> list[int] | None:
    """Token offsets (G + 1,) of the groups when every group's tokens are contiguous and in
    group order (`PackedBatch.segment_ids`, g * K + k, is), else None. One host sync."""
    S = num_groups * group_size
    group = segment_ids.clamp(0, max(S - 1, 0)) // group_size
    ok = ((segment_ids >= 0) & (segment_ids < S)).all() & (group[1:] >= group[:-1]).all()
    ends = torch.bincount(group, minlength=num_groups).cumsum(0)
    # Host sync: the chunk boundaries are Python ints (they slice the token range).
    host = torch.cat([ok.view(1).long(), ends]).tolist()
    return [0] + host[1:] if host[0] else None


def group_chunks(offsets: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Runs [g0, g1) of consecutive groups with at most max_tokens tokens each; a group with
    more tokens than that is a run of its own."""
    runs, g0 = [], 0
    for g in range(len(offsets) - 1):
        if g > g0 and offsets[g + 1] - offsets[g0] > max_tokens:
            runs.append((g0, g))
            g0 = g
    if len(offsets) > 1:
        runs.append((g0, len(offsets) - 1))
    return runs


def sweep_logprobs(backend, hidden: torch.Tensor, targets: torch.Tensor,
                   segment_ids: torch.Tensor | None = None, num_segments: int | None = None,
                   *, chunk_tokens: int | None = None) -> torch.Tensor:
    """The no-grad linear log-prob (scoring, reference passes) with the sweep's steps: per
    chunk of tokens the logits once into one reused (chunk, V) buffer (`backend.logits`: a
    cuBLAS GEMM on CUDA), then the row pass for log-sum-exp and target logit
    (`backend.lse_logp`). 2 N D V flops in GEMMs, plus one write and one read of each chunk's
    buffer. No group alignment is needed: nothing here crosses tokens.

    backend: `TorchSweep` or `TritonSweep` (no loss settings needed); hidden: (N, D);
    targets, segment_ids: (N,). Returns (N,) float32 per-token log-probs, or the (S,) sums per
    segment with segment_ids (empty segments 0); not differentiable.
    """
    N, V = hidden.shape[0], backend.weight.shape[0]
    C = chunk_tokens or max(1, backend.buffer_bytes // (V * backend.weight.element_size()))
    targets = targets.long()
    out = torch.zeros(num_segments if segment_ids is not None else N, dtype=torch.float32,
                      device=hidden.device)
    with workspace.get(min(C, N), V, backend.work, hidden.device) as buf:
        for a in range(0, N, C):
            b = min(a + C, N)
            z = backend.logits(hidden[a:b], buf[:b - a])
            _, logp = backend.lse_logp(z, targets[a:b], hidden[a:b])
            if segment_ids is None:
                out[a:b] = logp
            else:
                out.index_add_(0, segment_ids[a:b].long(), logp.float())
    return out


def linear_vrpo_sweep(backend, hidden, targets, segment_ids, offsets, group_size, ref_logps,
                      aux_prefs, *, grad_scale: float, need_dh: bool, need_dw: bool,
                      chunk_tokens: int | None = None, labelled: torch.Tensor | None = None,
                      label_scale=None):
    """Log-probs, the per-prompt VRPO losses and (optionally) dLoss/dH, dLoss/dW in one sweep.

    hidden: (N, D), targets, segment_ids: (N,) with each group's tokens contiguous, offsets:
    (G + 1,) token offsets of the groups (`group_offsets`), ref_logps: (G, K) or None,
    aux_prefs: (G, K / 2); grad_scale: dLoss / dL_b (1 / G for the mean, 1 for the sum);
    labelled: (G,) bool or None and label_scale (a float or a () tensor, required with
    labelled: a chunk must not normalise by its own count) as in `vrpo_fast.vrpo_loss`.
    backend: `TorchSweep` or `vrpo_fast.kernels.fused_linear_vrpo.TritonSweep`, whose
    `weight` (V, D) is the LM head in its work dtype; its steps work on the buffer in place:
    logits(h, out) -> z, lse_logp(z, targets, h) -> (lse or None: what head_grads_ needs
    besides the buffer, logp), loss_grad -> (per-prompt loss, dpolicy) (with `labelled`, which
    no loss kernel takes, `reference_loss_grad` instead), head_grads_(z, targets, lse, coef, h,
    dh, dw): dH of the chunk's rows into dh, dW added to dw.

    Per run of whole groups (`group_chunks`, at most chunk_tokens tokens; by default what fits
    in backend.buffer_bytes, or the largest group if that is longer, up to 4x): the logits once
    into one reused (chunk, V) buffer, lse and logp, the sequence sums, the groups' losses and
    dLoss/dpolicy, then the logit gradients in place in the buffer, dH for the run's rows and
    dW += dz^T h. A group longer than a chunk is a run of its own, streamed in chunk-sized
    slices: its slices' logits and log-sum-exps are computed twice (once for its sums, once for
    its gradients), the only recompute, and only for such groups.

    Returns (per-prompt losses (G,) fp32, policy sequence log-probs (G, K) fp32, dH (N, D) or
    None, dW (V, D) or None), the gradients in backend.work.
    """
    N, K = hidden.shape[0], group_size
    G = len(offsets) - 1
    weight = backend.weight
    V, dev = weight.shape[0], hidden.device
    C = chunk_tokens
    if C is None:
        # The buffer's budget, widened (up to 4x) to hold the largest group whole: a group
        # longer than a chunk costs its logits twice.
        C = max(1, backend.buffer_bytes // (V * weight.element_size()))
        largest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
        C = max(C, min(largest, 4 * C))
    need_grad = need_dh or need_dw
    policy = torch.zeros(G, K, dtype=torch.float32, device=dev)
    per = torch.empty(G, dtype=torch.float32, device=dev)
    dh = torch.empty(N, hidden.shape[1], dtype=backend.work, device=dev) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    with workspace.get(min(C, N), V, backend.work, dev) as buf:
        for g0, g1 in group_chunks(offsets, C):
            t0, t1 = offsets[g0], offsets[g1]
            slices = [(a, min(a + C, t1)) for a in range(t0, t1, C)]
            local = segment_ids[t0:t1] - g0 * K
            seq = policy[g0:g1].view(-1)
            for a, b in slices:
                z = backend.logits(hidden[a:b], buf[:b - a])
                lse, logp = backend.lse_logp(z, targets[a:b], hidden[a:b])
                seq.index_add_(0, local[a - t0:b - t0], logp)
            ref = None if ref_logps is None else ref_logps[g0:g1].float()
            if labelled is None:
                per[g0:g1], dpol = backend.loss_grad(policy[g0:g1], ref, aux_prefs[g0:g1],
                                                     grad_scale)
            else:
                per[g0:g1], dpol = reference_loss_grad(policy[g0:g1], ref, aux_prefs[g0:g1],
                                                       grad_scale, backend.loss, labelled[g0:g1],
                                                       label_scale)
            if not need_grad:
                continue
            # dLoss/dlogits_n = c_n (onehot - softmax) with c_n = dLoss/dpolicy_{seg_n} / T (the
            # 1/T of the chain rule through h W^T / T rides in c).
            coef = dpol.reshape(-1).float()[local] / backend.temperature
            coef = torch.where(targets[t0:t1] != backend.ignore_index, coef, 0.0)
            for a, b in slices:
                if len(slices) > 1:             # a group longer than a chunk: its slice again
                    z = backend.logits(hidden[a:b], buf[:b - a])
                    lse, _ = backend.lse_logp(z, targets[a:b], hidden[a:b])
                backend.head_grads_(z, targets[a:b], lse, coef[a - t0:b - t0], hidden[a:b],
                                    dh[a:b] if need_dh else None, dw)
    return per, policy, dh, dw


class _OneSweepVRPOLoss(torch.autograd.Function):
    """The sweep runs in forward and leaves dH and dW (for a scale of 1) in ctx; backward only
    multiplies them by the incoming scalar, in place (a second backward through the same graph
    is refused by autograd's saved-tensor version check)."""

    @staticmethod
    def forward(ctx, hidden, weight, sweep, reduction):
        per, policy, dh, dw = sweep(*ctx.needs_input_grad[:2])
        ctx.mark_non_differentiable(policy)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = hidden.dtype, weight.dtype
        return (per.mean() if reduction == "mean" else per.sum()), policy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_policy):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh.mul_(grad_loss).to(ctx.dtypes[0])
        dw = None if dw is None else dw.mul_(grad_loss).to(ctx.dtypes[1])
        return dh, dw, None, None


def one_sweep_vrpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        segment_ids: torch.Tensor, offsets: list[int], group_size: int,
                        ref_logps: torch.Tensor | None, aux_prefs: torch.Tensor, *,
                        beta: float, loss_type: str, estimator: str, reduction: str,
                        temperature: float = 1.0, ignore_index: int = -100,
                        labelled: torch.Tensor | None = None, label_scale=None,
                        chunk_tokens: int | None = None, backend_cls=TorchSweep):
    """The mean (or sum) over G prompt groups of the VRPO loss, from the LM head's inputs, in
    one sweep (`linear_vrpo_sweep`); differentiable in hidden and weight.

    hidden: (N, D), weight: (V, D), targets / segment_ids: (N,) (segment g * K + k, each
    group's tokens contiguous), offsets: `group_offsets(segment_ids, G, K)`, ref_logps:
    (G, K) or None, aux_prefs: (G, K / 2). reduction: mean | sum (a per-prompt output would
    need a vector backward, which stored gradients cannot give). labelled: (G,) bool or None,
    label_scale: as in `vrpo_fast.vrpo_loss` (default B / labelled prompts, of all G groups,
    not of a chunk). chunk_tokens: tokens per chunk
    (an operational setting: the result does not depend on it). backend_cls: TorchSweep, or
    TritonSweep for the GPU steps. Arguments are validated by the caller
    (`vrpo_fast.ops.FusedLinearVRPOLoss`).

    Returns (loss () fp32, policy sequence log-probs (G, K) fp32, detached).
    """
    G = len(offsets) - 1
    targets, segment_ids = targets.long(), segment_ids.long()      # gather / scatter indices
    backend = backend_cls(hidden, weight, temperature=temperature, ignore_index=ignore_index,
                          beta=beta, loss_type=loss_type, estimator=estimator)
    if labelled is not None and label_scale is None:
        # vrpo_loss's default, over the whole batch (a () tensor: no host sync).
        label_scale = G / labelled.sum().clamp(min=1)

    def sweep(need_dh, need_dw):
        return linear_vrpo_sweep(backend, hidden, targets, segment_ids, offsets, group_size,
                                 ref_logps, aux_prefs,
                                 grad_scale=1.0 / G if reduction == "mean" else 1.0,
                                 need_dh=need_dh, need_dw=need_dw, chunk_tokens=chunk_tokens,
                                 labelled=labelled, label_scale=label_scale)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _OneSweepVRPOLoss.apply(hidden, weight, sweep, reduction)
    per, policy, _, _ = sweep(False, False)
    return (per.mean() if reduction == "mean" else per.sum()), policy
