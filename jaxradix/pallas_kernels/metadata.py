"""The attention part of the step metadata: what every attention implementation reads."""

from __future__ import annotations

from dataclasses import dataclass

import jax


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    cu_q_lens: jax.Array  # [B+1] int32, query start of each sequence in the ragged token axis
    kv_lens: jax.Array  # [B] int32, cached + new tokens of each sequence (0 for padding rows)
    page_table: jax.Array  # [B, MP] int32, pool page of each sequence's p-th page (0 = unused)
    num_seqs: jax.Array  # [1] int32, live sequences; rows >= num_seqs are padding
    # A prefix several rows share (one radix-tree node's pages, e.g. a system prompt), for attention
    # that reads it once for all of them (gathered.py's cascade); the others read the page table and
    # ignore it. Invariant for a row b with shared_lens[b] = L > 0: L is a multiple of the page size,
    # page_table[b, :L/S] == shared_pages[:L/S], and L <= kv_lens[b] - q_len[b] (all of it cached).
    shared_pages: jax.Array | None = None  # [MP] int32, the shared prefix's pages (0-padded)
    shared_lens: jax.Array | None = None  # [B] int32, tokens of the shared prefix in each row: 0 or L
