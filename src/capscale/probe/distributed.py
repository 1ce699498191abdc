"""Exact data-parallel reduction of covariance states under ``torch.distributed``.

Every rank ends with the same merged states (not rank 0 only). Two
all-reduces of packed float64 buffers give the exact pooled moments:

    N = Σ_r n_r,   M = Σ_r n_r m_r / N,
    S = Σ_r [ S_r + n_r (m_r − M)(m_r − M)ᵀ ]

which is Chan's merge with its between-means correction, applied to all ranks
at once (the parallel-axis theorem: each rank adds ``Moments.scatter_about(M)``,
the same block merge that pools buckets). Memory is one copy of the states, not
one per rank as an all-gather would need.
"""

from __future__ import annotations

import torch

from capscale.spectrum._torch import Moments


def world_size(group=None) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def rank(group=None) -> int:
    if world_size(group) == 1:
        return 0
    return torch.distributed.get_rank(group)


def _comm_device(group) -> torch.device:
    backend = torch.distributed.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_moments(
    parts: list[Moments | None], dims: list[int | None], extra: list[float], group=None
) -> tuple[list[Moments | None], list[float]]:
    """Merge each entry across ranks; ``extra`` scalars (e.g. forward counts) are summed.

    ``parts[i]`` may be None on a rank that never saw data for it; ``dims[i]``
    then comes from the ranks that did. An entry with no width anywhere stays None.
    Results live on each entry's own device (the communication device otherwise).
    """
    dist = torch.distributed
    dev = _comm_device(group)
    d = torch.tensor([-1 if x is None else int(x) for x in dims], dtype=torch.int64, device=dev)
    dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
    dims = [None if x < 0 else int(x) for x in d.tolist()]
    live = [i for i, x in enumerate(dims) if x is not None]

    def local(i) -> Moments | None:
        p = parts[i]
        if p is None or p.count == 0:
            return None
        return Moments(p.count, p.mean.to(dev, torch.float64), p.scatter.to(dev, torch.float64), p.upper)

    loc = {i: local(i) for i in live}
    # Phase 1: counts and sums → global means.
    buf = torch.cat(
        [torch.tensor(extra, dtype=torch.float64, device=dev)]
        + [
            t
            for i in live
            for t in (
                torch.tensor([float(0 if loc[i] is None else loc[i].count)], dtype=torch.float64, device=dev),
                torch.zeros(dims[i], dtype=torch.float64, device=dev) if loc[i] is None else loc[i].mean * loc[i].count,
            )
        ]
    )
    dist.all_reduce(buf, group=group)
    extra_out = buf[: len(extra)].tolist()
    off, glob = len(extra), {}
    for i in live:
        n_all = round(float(buf[off]))
        glob[i] = (n_all, buf[off + 1 : off + 1 + dims[i]] / max(n_all, 1))
        off += 1 + dims[i]
    # Phase 2: each rank's scatter about the global mean, summed.
    parts2 = []
    for i in live:
        if loc[i] is not None:
            parts2.append(loc[i].scatter_about(glob[i][1]).reshape(-1))
        else:
            parts2.append(torch.zeros(dims[i] * dims[i], dtype=torch.float64, device=dev))
    buf = torch.cat(parts2) if parts2 else torch.zeros(0, dtype=torch.float64, device=dev)
    dist.all_reduce(buf, group=group)
    out: list[Moments | None] = [None] * len(parts)
    off = 0
    for i in live:
        n_all, mean = glob[i]
        size = dims[i] * dims[i]
        home = parts[i].scatter.device if parts[i] is not None else dev
        # upper: a rank's upper-triangle state leaves only the sum's upper triangle meaningful
        out[i] = Moments(n_all, mean.to(home), buf[off : off + size].reshape(dims[i], dims[i]).to(home), upper=True)
        off += size
    return out, extra_out


class _Elsewhere:
    """A sharded site's whole state, assembled on the writing rank only."""

    def __repr__(self) -> str:
        return "ELSEWHERE"


ELSEWHERE = _Elsewhere()


class Foreign:
    """A sharded site whose blocks another tensor-parallel group computes (its owner): pipeline
    stages hold other layers, data-parallel replicas the same blocks. ``lead``: the owner group's
    first global rank, which sends the writer that site's rows (:func:`send_rows`)."""

    def __init__(self, lead: int):
        self.lead = lead

    def __repr__(self) -> str:
        return f"Foreign(lead={self.lead})"


def send_rows(payload, writer: int) -> None:
    """Rows (or monitor records) of the sites an owner group computed, from its lead to the writer."""
    torch.distributed.send_object_list([payload], dst=writer)


def receive_rows(lead: int):
    box: list = [None]
    torch.distributed.recv_object_list(box, src=lead)
    return box[0]


def _writer(group) -> int:
    """The global rank that writes the run's rows: rank 0 of ``group``."""
    return 0 if group is None else torch.distributed.get_global_rank(group, 0)


def reduce_sites(entries: list[tuple], per_site: int, forwards: int, group=None, assemble: bool = True, tp=None):
    """Merge a window's states across ranks by key (stack, layer, site), not by position.

    ``entries``: ``(site, parts | None, dim, shard | None)`` per local site, ``parts`` its
    ``per_site`` states (buckets). A key present on several ranks (data or expert
    parallel) is merged; a key present on one rank (a pipeline stage's layers) passes
    through; every rank gets every key, in one order (ranks' own orders, rank by rank).
    Tensor-parallel sites (``shard``) merge their blocks over the shard's replicas and,
    with ``assemble``, are gathered whole on the writing rank (:data:`ELSEWHERE` on the
    others); without, their parts stay merged :class:`~capscale.probe.sharded.BlockState`\\ s.
    Returns ``([(site, parts), ...], forwards summed over the ranks)``.
    """
    from capscale.probe import sharded
    from capscale.probe.sites import Site

    dist = torch.distributed
    mine = {(s.stack, s.layer, s.site): (s, parts, dim, shard) for s, parts, dim, shard in entries}
    heads = [
        (k, s.name, s.capture, dim, None if sh is None else min(dist.get_process_group_ranks(sh.group)))
        for k, (s, _, dim, sh) in mine.items()
    ]
    every: list = [None] * world_size(group)
    dist.all_gather_object(every, heads, group=group)
    writer = _writer(group)
    union: dict = {}
    holders: dict = {}  # a sharded key: the leads (first global ranks) of the groups that hold it
    writers: dict = {}  # ... and the writer's own group's lead, where the writer holds it
    for rank, rank_heads in zip(process_ranks(group), every):
        for k, name, capture, dim, lead in rank_heads:
            if k not in union:
                union[k] = [name, capture, dim]
            elif dim is not None:
                union[k][2] = max(dim, union[k][2] or 0)
            if lead is not None:
                holders.setdefault(k, set()).add(lead)
                if rank == writer:
                    writers[k] = lead
    # Each sharded key is computed by one group, its owner: the writer's, else the lowest holding it.
    owner = {k: writers.get(k, min(leads)) for k, leads in holders.items()}
    # A key sharded on any rank is sharded everywhere (a pipeline stage sees the others' keys as
    # headers only): the plain reduction runs over the same keys on every rank.
    plain = [k for k in union if k not in owner]
    # Under tensor parallelism a site left whole (not sharded) sees the same rows on every rank
    # of the tensor-parallel group: the group's first rank alone contributes them.
    # (``tp``: the model's tensor-parallel group where no site is sharded, e.g. replicated experts.)
    tp = next((e[3].group for e in entries if e[3] is not None), tp)
    lead = tp is None or dist.get_rank(tp) == 0
    flat, dims = [], []
    for k in plain:
        parts = mine[k][1] if k in mine and lead else None
        flat += [None] * per_site if parts is None else list(parts)
        dims += [union[k][2]] * per_site
    flat, (total,) = reduce_moments(flat, dims, [float(forwards)], group)
    merged = {k: flat[j * per_site : (j + 1) * per_site] for j, k in enumerate(plain)}
    cut = [k for k in union if k in owner and k in mine and mine[k][3] is not None]
    states = []
    for k in cut:
        s, parts, dim, shard = mine[k]
        if parts is None:  # no rows here yet: an empty block, so that every rank joins the collectives
            dev = torch.device("cpu")
            parts = [
                sharded.BlockState(
                    0,
                    torch.zeros(dim, dtype=torch.float64, device=dev),
                    torch.zeros(shard.width, dim, dtype=torch.float64, device=dev),
                    shard.offset,
                )
            ] * per_site
        states += parts
    if cut:
        states = sharded.reduce_blocks(states, mine[cut[0]][3].replicas)
    for j, k in enumerate(cut):
        parts, shard = states[j * per_site : (j + 1) * per_site], mine[k][3]
        if min(dist.get_process_group_ranks(shard.group)) != owner[k]:
            parts = Foreign(owner[k])  # a replica's group, or another stage's: the owner computes it
        elif assemble:
            whole = None
            if writer in dist.get_process_group_ranks(shard.group):
                whole = sharded.assemble(parts, list(shard.widths), shard.group, writer)
            parts = ELSEWHERE if whole is None else whole
        merged[k] = parts
    for k in owner:
        merged.setdefault(k, Foreign(owner[k]))  # held by no shard of this rank (another stage's)
    out = []
    for k, (name, capture, _) in union.items():
        site = mine[k][0] if k in mine else Site(k[1], k[2], name, None, capture, k[0])
        out.append((site, merged[k]))
    return out, round(total)


def process_ranks(group) -> list[int]:
    """The global ranks of ``group`` (the world for None), in group-rank order."""
    dist = torch.distributed
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
