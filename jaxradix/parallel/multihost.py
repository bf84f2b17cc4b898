"""Multi-host serving on jax.distributed: one mesh over every process's devices, one scheduler.

Rank 0 runs the scheduler (and the HTTP server); every rank executes the same jitted steps on its
own devices. Before each device call rank 0 broadcasts a fixed-size command header and then the
call's inputs with ``multihost_utils.broadcast_one_to_all`` (a psum over the global mesh, no
hand-made protocol); the other ranks run ``StepChannel.follow``, which replays exactly those calls.
A collective that fails (a rank died) raises on the survivors; the engine then stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

# header: [command, bucket tokens, bucket rows, prompt logprobs, sampler plan bits]
HEADER = 5
CMD_STEP, CMD_INIT_SLOT, CMD_STOP = 1, 2, 3


class RankLost(RuntimeError):
    """A collective across the processes failed: another rank died or the job is shutting down."""


def init_distributed(nnodes: int, node_rank: int, dist_init_addr: str | None, *,
                     heartbeat_timeout_s: int = 30, init_timeout_s: int = 300) -> None:
    """jax.distributed.initialize for nnodes > 1 (before anything touches a JAX backend)."""
    if nnodes == 1 or jax.distributed.is_initialized():
        return
    logger.info("jax.distributed: rank %d of %d, coordinator %s", node_rank, nnodes, dist_init_addr)
    jax.distributed.initialize(coordinator_address=dist_init_addr, num_processes=nnodes, process_id=node_rank,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=init_timeout_s)


def is_leader() -> bool:
    return jax.process_index() == 0


@dataclass(frozen=True)
class Command:
    kind: int
    tokens: int = 0
    rows: int = 0
    prompt_logprobs: bool = False
    plan: int = 0  # SamplerPlan.bits() of a split-sampler step

    def header(self) -> np.ndarray:  # [HEADER] int32, what rank 0 broadcasts first
        return np.array([self.kind, self.tokens, self.rows, int(self.prompt_logprobs), self.plan], np.int32)

    @staticmethod
    def from_header(h: np.ndarray) -> Command:
        return Command(int(h[0]), int(h[1]), int(h[2]), bool(h[3]), int(h[4]))


def _broadcast(tree: Any) -> Any:
    try:
        return multihost_utils.broadcast_one_to_all(tree)
    except Exception as e:  # noqa: BLE001 - the runtime's error for a lost peer has no dedicated type
        raise RankLost(f"lost a rank of the distributed job: {e}") from e


class StepChannel:
    """Rank 0 -> every rank: which device call comes next, and its host inputs."""

    def send(self, cmd: Command, payload: Any = None) -> Any:
        """On rank 0, before the device call; returns the payload (as every rank now holds it)."""
        _broadcast(cmd.header())
        return None if payload is None else _broadcast(payload)

    def warm(self, trees: list[Any]) -> None:
        """Every rank, at start-up in the same order: broadcast each shape once (each compiles)."""
        _broadcast(np.zeros(HEADER, np.int32))
        for tree in trees:
            _broadcast(jax.tree.map(np.zeros_like, tree))

    def stop(self) -> None:
        """Rank 0: the followers leave follow()."""
        _broadcast(Command(CMD_STOP).header())

    def receive(self, template: Callable[[Command], Any]) -> tuple[Command, Any]:
        """On ranks > 0: the next command and its payload, shaped like template(cmd)."""
        h = _broadcast(np.zeros(HEADER, np.int32))
        cmd = Command.from_header(h)
        if cmd.kind == CMD_STOP:
            return cmd, None
        return cmd, _broadcast(jax.tree.map(np.zeros_like, template(cmd)))

    def follow(self, template: Callable[[Command], Any], execute: Callable[[Command, Any], None]) -> None:
        """Replay rank 0's device calls until it sends CMD_STOP (raises RankLost if rank 0 is gone)."""
        while True:
            cmd, payload = self.receive(template)
            if cmd.kind == CMD_STOP:
                logger.info("rank %d: rank 0 stopped the job", jax.process_index())
                return
            execute(cmd, payload)
