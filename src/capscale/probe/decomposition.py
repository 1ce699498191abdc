"""A window's spectra rows from its states: pooled and per-bucket rows, each site's
state decomposed as its spectrum method says; tensor-parallel states one whole
state at a time. Pure functions of the states: the background worker runs them too.
"""

from __future__ import annotations

import math

import torch

from capscale.probe import distributed, sharded
from capscale.probe.accumulate import Moments
from capscale.probe.estimated import resolve as resolve_spectrum
from capscale.probe.records import add_js_divergence, spectrum_rows
from capscale.probe.sites import Site
from capscale.spectrum import BUCKETS

# The sampling status of a site that captured nothing in a window (its module never ran).
NOT_RUN = "not-run"


def decompose(start: int, states: list, bucketed: bool, spectrum: str = "exact", js: bool = True) -> list[dict]:
    """Spectra rows of one window's states (pools the buckets into "all"); runs on any thread.

    ``js=False``: without the pre/post divergence, which pairs rows of several sites (added
    by the caller once every site's rows are in)."""
    entries, marks = [], []
    for site, parts in states:
        if parts is None:  # the site never saw data anywhere: its width is unknown
            nothing = Moments(0, torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
            named = {b: nothing for b in ("all", *(BUCKETS if bucketed else ()))}
        elif bucketed:
            named = {"all": Moments.merge_all(parts), **dict(zip(BUCKETS, parts))}
        else:
            named = {"all": parts[0]}
        ran = named["all"].count > 0
        for bucket, m in named.items():
            labels = {"step": start, "layer": site.layer, "site": site.site, "bucket": bucket}
            entries.append((m, {**labels, "stack": site.stack, "module": site.name}))
            marks.append((parts is None, ran))
    if all(resolve_spectrum(spectrum, m.dim) == "exact" for m, _ in entries):
        rows = spectrum_rows(entries)
    else:
        rows = spectrum_rows(entries, method=spectrum)
    for row, (unknown, ran) in zip(rows, marks):
        if unknown:
            row["dim"] = row["max_empirical_rank"] = 0
            row["samples_per_dim"] = math.nan
        if not ran:  # a site that captured nothing in the window says so
            row["sampling_status"] = NOT_RUN
    if js:
        add_js_divergence(rows)
    return rows


def rows_site_at_a_time(
    entries: list, start: int, sites: list[Site], shards: dict, group, spectrum: str, bucketed: bool
) -> list[dict]:
    """Rows of a window with tensor-parallel sites, one whole state at a time (docs/parallel.md).

    The writing rank assembles one state (a site's bucket), decomposes it and lets it go
    before the next state's blocks arrive: its extra host memory is one whole state, not
    every site's. With a Lanczos or hard-only spectrum nothing is assembled: the ranks of
    the site's tensor-parallel group compute its rows from their blocks. ``entries``: the
    window's full sites gathered with ``assemble=False``; ``shards`` by site index.
    """
    prepared = prepare_sharded(entries, start, sites, shards, group, spectrum, bucketed, defer=False)
    return finish_sharded(start, prepared, bucketed, spectrum)


def prepare_sharded(
    entries: list, start: int, sites: list[Site], shards: dict, group, spectrum: str, bucketed: bool, defer: bool
) -> list:
    """The collective part of :func:`rows_site_at_a_time` (every rank, on the training thread), per entry:
    ``("plain", site, parts | None)`` for a site left whole; for a sharded site this rank writes,
    ``("sharded", rows, not_run)``; None where another rank writes it. Without ``defer`` each
    whole state ("all" merged block by block first) is decomposed and let go at once.

    With ``defer`` (the background worker) and an exact spectrum, each tensor-parallel group
    deals the sharded sites it computes out over its ranks, the k-th to its group's rank k mod
    size: that rank gets ``("wholes", site, states)``, the site's stored states (buckets)
    assembled whole, one at a time, in host memory that nothing else shares (its worker's
    snapshots: no copy), and the writer ``("remote", rank)``, whose rows :func:`finish_sharded`
    receives from that rank's worker. Each rank then holds 1/size of its group's whole states
    and decomposes them on its own worker; another pipeline stage's group tells the writer
    which rank that is (its first rank, on the training thread).
    """
    shards = {(sites[i].stack, sites[i].layer, sites[i].site): sh for i, sh in shards.items()}
    writer = distributed._writer(group)
    me = torch.distributed.get_rank()
    dealt = 0
    out: list = []
    for site, parts in entries:
        if isinstance(parts, distributed.Foreign):  # another group's: the writer hears from its lead
            if me == writer:
                msg = distributed.receive_rows(parts.lead)  # its rows, or which rank's worker sends them
                out.append(("remote", msg[1]) if msg[0] == "deferred" else ("sharded", msg[1], msg[2]))
            else:
                out.append(None)
            continue
        if not (parts and isinstance(parts[0], sharded.BlockState)):
            out.append(("plain", site, None if any(p is None for p in parts) else parts))
            continue
        shard = shards[(site.stack, site.layer, site.site)]
        ranks = torch.distributed.get_process_group_ranks(shard.group)
        # The rank that decides for the site: the writer, or (another pipeline stage's group) its
        # group's first rank, which then tells the writer (its rows, or which worker sends them).
        lead = writer if writer in ranks else ranks[0]
        not_run = not any(p.count for p in parts)
        method = sharded.resolve_on(spectrum, shard, lead)
        if method != "exact":  # from the blocks, nothing assembled (collectives: here, not on a worker)
            rows = sharded.estimated_rows(site, start, parts, shard, method, bucketed)
        elif defer:  # the stored states, one at a time, on the site's rank: its worker merges "all"
            owner, dealt = _owner(ranks, dealt), dealt + 1
            wholes = [sharded.assemble([p], list(shard.widths), shard.group, owner) for p in parts]
            if me == owner:
                out.append(("wholes", site, [w[0] for w in wholes]))
            else:
                out.append(("remote", owner) if me == writer else None)
            if lead != writer and me == lead:
                distributed.send_rows(("deferred", owner), writer)
            continue
        else:  # one whole state at a time: "all" (the buckets merged block by block), then each bucket
            rows = []
            for bucket, block in sharded.named_blocks(parts, bucketed).items():
                whole = sharded.assemble([block], list(shard.widths), shard.group, lead)
                if whole is not None:
                    rows += spectrum_rows([(whole[0], sharded.row_labels(site, start, bucket))])
                del whole  # before the next state's blocks arrive
        if lead != writer and me == lead:
            distributed.send_rows(("rows", rows, not_run), writer)
        out.append(("sharded", rows, not_run) if me == writer else None)
    return out


def _owner(ranks: list[int], k: int) -> int:
    """The rank that assembles and decomposes the k-th dealt-out site: round robin over its group."""
    return ranks[k % len(ranks)]


def finish_sharded(start: int, prepared: list, bucketed: bool, spectrum: str, link=None) -> list[dict]:
    """The window's rows from :func:`prepare_sharded`'s entries, in their order (runs on any thread).
    A deferred whole state is decomposed and dropped one at a time.

    ``link``: ``(group, writer)``, a gloo group of the run's ranks that only the background workers
    use, in window order, for the dealt-out sites: a rank sends the rows of its share to the
    writer (or its error, so that the writer never waits for nothing), and the writer receives
    them after decomposing its own. No collective of training's groups is used.
    """
    writes = link is None or torch.distributed.get_rank() == link[1]
    if not writes:
        _send_share(start, prepared, bucketed, link)
    parts: list = []
    error = None
    try:
        plain = [(p[1], p[2]) for p in prepared if p is not None and p[0] == "plain"]
        plain_rows = iter(decompose(start, plain, bucketed, spectrum, js=False)) if plain else iter(())
        per = 1 + len(BUCKETS) if bucketed else 1
        for p in prepared:
            if p is None or (p[0] == "wholes" and not writes):
                continue  # another rank's, or sent to the writer
            if p[0] == "plain":
                parts.append([next(plain_rows) for _ in range(per)])
            elif p[0] == "wholes":  # as a site left whole (its "all" merged here); then let go
                try:
                    parts.append(decompose(start, [(p[1], p[2])], bucketed, "exact", js=False))
                finally:
                    p[2].clear()
            elif p[0] == "remote":
                parts.append(p)  # its rows arrive below
            else:
                _, rows, not_run = p
                if not_run:  # a site that captured nothing in the window says so
                    for row in rows:
                        row["sampling_status"] = NOT_RUN
                parts.append(rows)
    except Exception as exc:  # raised once the other ranks' shares are in: they would wait for ever
        error = exc
    if link is not None and writes:
        shares = _receive_shares([p[1] for p in prepared if p is not None and p[0] == "remote"], link)
        if error is None:
            parts = [shares[p[1]].pop(0) if isinstance(p, tuple) else p for p in parts]
    if error is not None:
        raise error
    out = [row for rows in parts for row in rows]
    add_js_divergence(out)
    return out


def _send_share(start: int, prepared: list, bucketed: bool, link) -> None:
    """This rank's dealt-out sites' rows (one list per site, in order) to the writer, or its error."""
    mine = [p for p in prepared if p is not None and p[0] == "wholes"]
    if not mine:
        return
    try:
        payload: tuple = ("rows", [])
        for p in mine:
            payload[1].append(decompose(start, [(p[1], p[2])], bucketed, "exact", js=False))
            p[2].clear()
    except Exception as exc:
        payload = ("error", f"rank {torch.distributed.get_rank()}: {type(exc).__name__}: {exc}")
        raise
    finally:
        torch.distributed.send_object_list([payload], dst=link[1], group=link[0])


def _receive_shares(owners: list[int], link) -> dict[int, list[list[dict]]]:
    """Each owner's rows (one list per site, in deal order), received once per owner and window."""
    got: dict[int, list] = {}
    errors = []
    for r in dict.fromkeys(owners):
        box: list = [None]
        torch.distributed.recv_object_list(box, src=r, group=link[0])
        kind, body = box[0]
        if kind == "error":
            errors.append(body)
        got[r] = body
    if errors:
        raise RuntimeError("tensor-parallel spectra failed on another rank's worker: " + "; ".join(errors))
    return got


def worker_link(group):
    """``(gloo group, writer)`` over the run's ranks, for :func:`finish_sharded`: the background
    workers' own group (gloo: host memory, no accelerator stream shared with training).
    Collective over the world (``new_group``), once, at attach."""
    ranks = distributed.process_ranks(group)
    return torch.distributed.new_group(ranks, backend="gloo"), distributed._writer(group)
