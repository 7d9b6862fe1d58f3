"""Contrastive pieces of U2PL: the per-class memory bank of negatives, anchor and negative sampling, InfoNCE.

U2PL's contrastive loss (methods.md s. 6, step 6) turns unreliable pixels into negatives: every class gets
anchors (reliable members), a prototype (the teacher's mean member feature) and negatives drawn from a
per-class FIFO queue of teacher features, filled with the pixels whose rank of that class falls in a window.
These pieces are tensors in, tensors out (plus the bank, a module saved with the method's state), and know
nothing of the method's schedule, teacher or mixing; they live apart from ``u2pl.py`` so the method file
reads as the paper's steps, and the pieces can be tested on their own and shared, as ``mixing.py`` is.

Implementation choices: no host synchronisation (fixed-size sampling with cumsum + searchsorted,
ring-buffer writes with fixed shapes into one buffer with a sink row); similarities against the bank are
computed in the bank's dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from .common import IGNORE


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Per-image one-hot B,H,W -> B,C,H,W bool; 255 (or any value outside [0, C)) gives all False."""
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    return labels.unsqueeze(1) == classes


def class_ranks(prob: Tensor) -> Tensor:
    """Rank of every class in each pixel's sorted probabilities (0 = most likely). B,C,h,w -> B,C,h,w long."""
    order = prob.permute(0, 2, 3, 1).argsort(dim=-1, descending=True)  # B,h,w,C: sort contiguous rows
    ranks = torch.arange(prob.shape[1], device=prob.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks).permute(0, 3, 1, 2)


def contrast_sets(
    prob_t: Tensor,
    labels: Tensor,
    unreliable: Tensor,
    n_labeled: int,
    delta_p: float,
    low_rank: int,
    high_rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Members, anchor candidates and negative candidates of every class (methods.md s. 6, step 6). B,C,h,w bool.

    ``labels``: GT on the first ``n_labeled`` images, reliable pseudo-labels on the others, 255 elsewhere.
    Members of c: label c. Anchors: members whose teacher probability for c is > ``delta_p``. Negatives:
    labeled pixels with a valid GT != c but c in the teacher's top ``low_rank``, and unreliable unlabeled
    pixels whose rank of c is in [low_rank, high_rank).
    """
    members = one_hot(labels, prob_t.shape[1])
    rank = class_ranks(prob_t)
    labeled = (torch.arange(labels.shape[0], device=labels.device) < n_labeled).view(-1, 1, 1, 1)
    hard = labeled & (labels != IGNORE).unsqueeze(1) & ~members & (rank < low_rank)
    unsure = ~labeled & unreliable.unsqueeze(1) & (rank >= low_rank) & (rank < high_rank)
    return members, members & (prob_t > delta_p), hard | unsure


def sample_masked(mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``n`` indices per row drawn uniformly with replacement among the row's True entries. C,P -> C,n ; C.

    Fixed shapes, no host sync: the k-th True entry is found by searchsorted on the cumulative count.
    Rows without True entries get index 0; the second output (row counts) says which rows are usable.
    """
    cum = mask.long().cumsum(1)  # C,P
    count = cum[:, -1]
    k = (torch.rand(mask.shape[0], n, device=mask.device) * count.unsqueeze(1)).long()
    k = torch.minimum(k, (count - 1).clamp_min(0).unsqueeze(1))
    idx = torch.searchsorted(cum, k + 1)  # first position whose count reaches k+1
    return idx.clamp_max(mask.shape[1] - 1), count


def info_nce(
    anchors: Tensor, protos: Tensor, negatives: Tensor, use: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """InfoNCE per class with cosine similarity / tau, positive at index 0, mean over classes in ``use``.

    anchors C,Q,D; protos C,D; negatives C,Q,N,D (unit vectors, as stored in the bank); use C bool.
    The anchor-negative similarities are computed in the negatives' dtype (the bank's: a matmul, as autocast
    would), everything else in float32. Returns (loss, number of classes used); 0 when none is used.
    """
    a = F.normalize(anchors.float(), dim=-1)
    pos = (a * F.normalize(protos.float(), dim=-1).unsqueeze(1)).sum(-1, keepdim=True)  # C,Q,1
    neg = torch.einsum("cqd,cqnd->cqn", a.to(negatives.dtype), negatives).float()  # C,Q,N
    logits = torch.cat([pos, neg], dim=-1) / tau
    per_class = (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean(1)  # C
    n_used = use.sum()
    return torch.where(use, per_class, 0.0).sum() / n_used.clamp_min(1), n_used


class MemoryBank(nn.Module):
    """Per-class FIFO queues of unit-length teacher features (the negatives), saved with the state_dict.

    All queues live in one ``feats`` buffer: class c owns rows ``offsets[c] : offsets[c] + sizes[c]``, and
    the last row is a sink that absorbs the writes of non-candidates, so every write has a fixed shape
    (no concatenation, no host round trip). ``ptr`` is each queue's next slot, ``count`` its filled length.
    Under DDP the candidates of every process are gathered first, so all processes hold the same bank.
    """

    def __init__(self, sizes: Sequence[int], dim: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.sizes = list(sizes)
        offsets = [0, *itertools.accumulate(self.sizes)][:-1]
        self.register_buffer("feats", torch.zeros(sum(self.sizes) + 1, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros(len(self.sizes), dtype=torch.long))
        self.register_buffer("count", torch.zeros(len(self.sizes), dtype=torch.long))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("capacity", torch.tensor(self.sizes, dtype=torch.long), persistent=False)
        self._out: Tensor | None = None  # sample's result, reused (not state: not saved, not moved)

    @torch.no_grad()
    def push(self, feats: Tensor, mask: Tensor, per_row: int | None = None) -> None:
        """Enqueue ``feats[mask[:, c]]`` into queue c for every class c. feats P,D (unit); mask P,C bool.

        Queue c keeps its newest ``sizes[c]`` entries: of n candidates the last m = min(n, size) are
        written to the consecutive slots from ``ptr``; the others go to the sink row. ``per_row``: the
        caller's guarantee that no row is a candidate of more than that many classes (U2PL's rank windows
        give one); the write then takes ``per_row`` x P rows instead of C x P, most of which would go to
        the sink.
        """
        feats = dist.all_gather_cat(feats.to(self.feats.dtype).contiguous())
        mask = dist.all_gather_cat(mask.to(torch.uint8).contiguous()).bool()  # P,C
        if mask.shape[0] == 0:  # nothing to enqueue (every process pushed no row)
            return
        by_class = mask.t()  # C,P
        rank = by_class.long().cumsum(1) - 1  # C,P: position among the class's candidates
        n = rank[:, -1] + 1
        m = torch.minimum(n, self.capacity)
        skip = (n - m).unsqueeze(1)  # the oldest candidates that do not fit
        slot = (self.ptr.unsqueeze(1) + rank - skip) % self.capacity.unsqueeze(1)
        dst = torch.where(
            by_class & (rank >= skip), self.offsets.unsqueeze(1) + slot, self.feats.shape[0] - 1
        )
        if per_row is not None and per_row < len(self.sizes):
            # each row's (at most per_row) candidate classes first; a row with fewer also picks
            # non-candidates, whose destination is already the sink
            classes = mask.to(torch.float32).topk(per_row, dim=1).indices  # P,per_row
            dst = dst.gather(0, classes.t())  # per_row,P: dst[classes[p, k], p]
        for row in dst:
            self.feats.index_copy_(0, row, feats)
        self.ptr.copy_((self.ptr + m) % self.capacity)
        self.count.copy_(torch.minimum(self.count + m, self.capacity))

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` features per class drawn uniformly from the filled part -> C,n,D (bank dtype) ; non-empty C.

        The C,n,D result is written into one tensor kept from call to call and overwritten by the next
        call: U2PL's 256 x 50 negatives per class, 256 bfloat16 values each, are 46 MB for shapes' 7 classes
        (138 MB for VOC's 21), and on the CPU a new block that large is fresh pages every step (the gather took
        24.7 ms instead of 4.4 on one thread). Use it before the next call; autograd refuses a backward through
        an overwritten one.
        """
        c = len(self.sizes)
        last = (self.count - 1).clamp_min(0).unsqueeze(1)
        k = (torch.rand(c, n, device=self.feats.device) * self.count.unsqueeze(1)).long()
        idx = self.offsets.unsqueeze(1) + torch.minimum(k, last)  # C,n
        out = self._out
        if out is None or out.shape[0] != c * n or out.device != self.feats.device or out.dtype != self.feats.dtype:
            out = self._out = self.feats.new_empty(c * n, self.feats.shape[1])
        torch.index_select(self.feats, 0, idx.flatten(), out=out)
        return out.view(c, n, -1), self.count > 0


def contrastive_loss(
    rep_s: Tensor,
    rep_t: Tensor,
    prob_t: Tensor,
    labels: Tensor,
    unreliable: Tensor,
    n_labeled: int,
    bank: MemoryBank,
    *,
    num_queries: int,
    num_negatives: int,
    temperature: float,
    delta_p: float,
    low_rank: int,
    high_rank: int,
) -> tuple[Tensor, Tensor]:
    """U2PL's contrastive loss at feature resolution; returns (loss, number of classes used).

    rep_s B,D,h,w (student, gradient flows into the anchors only); rep_t B,D,h,w and prob_t B,C,h,w (teacher);
    labels / unreliable B,h,w as in ``contrast_sets``. The teacher's negatives are pushed into the bank
    before sampling; each class uses its own queue; classes without anchors or an empty queue are skipped.
    """
    d = rep_s.shape[1]
    members, anchors, negatives = contrast_sets(
        prob_t, labels, unreliable, n_labeled, delta_p, low_rank, high_rank
    )
    with torch.autocast(rep_s.device.type, enabled=False):  # float32 even under autocast
        feats_t = rep_t.detach().permute(0, 2, 3, 1).reshape(-1, d).float()  # P,D
        members = _by_class(members).float()  # C,P
        protos = members @ feats_t / members.sum(1, keepdim=True).clamp_min(1)  # C,D
        bank.push(  # a pixel is a negative of at most low_rank (labeled) or high - low (unlabeled) classes
            F.normalize(feats_t, dim=1),
            negatives.permute(0, 2, 3, 1).reshape(-1, negatives.shape[1]),
            per_row=max(low_rank, high_rank - low_rank),
        )
        idx, n_anchors = sample_masked(_by_class(anchors), num_queries)  # C,Q
        neg, filled = bank.sample(num_queries * num_negatives)  # C,Q*N,D
        neg = neg.view(neg.shape[0], num_queries, num_negatives, d)
        # the anchors' student features gathered from B,D,h*w directly: no P,D copy of the whole map (nor its
        # backward), of which the C x Q anchors are a few percent
        hw = rep_s.shape[2] * rep_s.shape[3]
        anchors_s = rep_s.flatten(2)[idx // hw, :, idx % hw].float()  # C,Q,D
        return info_nce(anchors_s, protos, neg, (n_anchors > 0) & filled, temperature)


def _by_class(m: Tensor) -> Tensor:
    """B,C,h,w -> C,P with P = B*h*w in (image, row, column) order."""
    return m.transpose(0, 1).reshape(m.shape[1], -1)
