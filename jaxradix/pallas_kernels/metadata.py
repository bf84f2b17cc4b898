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
