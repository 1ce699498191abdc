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
    shards = {(sites[i].stack, sites[i].layer, sites[i].site): sh for i, sh in shards.items()}
    writer = distributed._writer(group)
    per_site: list[list[dict] | None] = [None] * len(entries)
    plain = []
    for j, (site, parts) in enumerate(entries):
        if not (parts and isinstance(parts[0], sharded.BlockState)):
            plain.append((j, (site, None if any(p is None for p in parts) else parts)))
            continue
        shard = shards[(site.stack, site.layer, site.site)]
        if writer not in torch.distributed.get_process_group_ranks(shard.group):
            continue  # another tensor-parallel group's replica of the same blocks writes it
        method = sharded.resolve_on(spectrum, shard, writer)
        if method != "exact":
            rows = sharded.estimated_rows(site, start, parts, shard, method, bucketed)
            if not any(p.count for p in parts):
                for row in rows:
                    row["sampling_status"] = NOT_RUN
            per_site[j] = rows if torch.distributed.get_rank() == writer else None
            continue
        # One whole state at a time: "all" (the buckets merged block by block), then each bucket.
        rows = []
        for bucket, block in sharded.named_blocks(parts, bucketed).items():
            whole = sharded.assemble([block], list(shard.widths), shard.group, writer)
            if whole is not None:
                rows += spectrum_rows([(whole[0], sharded.row_labels(site, start, bucket))])
            del whole  # before the next state's blocks arrive
        if rows and not any(p.count for p in parts):
            for row in rows:
                row["sampling_status"] = NOT_RUN
        per_site[j] = rows or None
    if plain:
        rows = iter(decompose(start, [e for _, e in plain], bucketed, spectrum, js=False))
        per = 1 + len(BUCKETS) if bucketed else 1
        for j, _ in plain:
            per_site[j] = [next(rows) for _ in range(per)]
    out = [r for rows in per_site if rows for r in rows]
    add_js_divergence(out)
    return out
