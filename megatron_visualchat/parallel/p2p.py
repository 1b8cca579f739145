"""The p2p communicator our interleaved (virtual pipeline) schedules run with, fixing two things in megatron-core
0.16.1's own.

- **Crossed tensors on a two-rank pipeline.** With ``batch_p2p_comm`` (the default), one call posts its sends and
  receives on one group in the order send-prev, recv-prev, send-next, recv-next. With PP=2, prev and next are the
  same peer. So when a call sends an activation and a gradient to that peer, both ranks' first send meets the
  other's first receive, and a gradient lands in the activation's buffer. Measured over gloo: PP=2 x VPP=2 with
  4 microbatches (the first steady-state calls) gave a loss of 5.5524 against 5.5544, and gradients off by 33 at
  scale 0.017. With 2 microbatches nothing crosses. megatron-core's unbatched ops (``_p2p_ops``) send the two
  directions of a two-rank pipeline over different groups, so we use those (``batch_p2p_comm=False``). Then the
  losses are equal and the gradients bit-identical.
- **Deadlocked shapes** (``variable_seq_lengths``, attention mode ``cross``, whose p2p tensor grows with a batch's
  images). megatron-core sends the shapes before the tensors, in a step of its own that also waits for its shape
  sends. The interleaved schedule posts, in one call, a send that the peer receives only in its next call. The
  tensors cope with that (the peer's next call matches it), but the blocking shape step leaves both ranks waiting
  (measured: PP=2 x VPP=2 hangs). ``_communicate_shapes`` here waits only for the shapes it receives. It keeps its
  shape sends until the peer takes them, and it gives each direction its own tag, apart from the tensors' tag 0,
  so a shape never pairs with a tensor or with the other direction's shape.

Both are checked over gloo (tests/parallel/test_cross_attention_equivalence.py, PP=2 x VPP=2). Not yet on GPUs:
NCCL ignores tags, so there the shapes would rely on megatron-core's call-by-call order.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import p2p_communication
from megatron.core.process_groups_config import ProcessGroupCollection


class InterleavedP2PCommunicator(p2p_communication.P2PCommunicator):
    def __init__(self, pp_group, config):
        # Tensors through megatron-core's unbatched ops (the module docstring says why).
        config = copy.copy(config)  # not dataclasses.replace: TransformerConfig's checks refuse variable lengths
        config.batch_p2p_comm = False
        super().__init__(pp_group=pp_group, config=config)
        self._shape_sends = []  # posted, not yet received by the peer

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        device = torch.cuda.current_device()
        requests, received = [], []
        # One tag per direction, apart from the tensors' tag 0: shapes never pair with tensors or the other way.
        for send, recv, peer, send_tag, recv_tag in ((tensor_send_next, recv_next, self.next_rank, 1, 2),
                                                     (tensor_send_prev, recv_prev, self.prev_rank, 2, 1)):
            if send is not None:
                shape = torch.tensor(send.size(), device=device, dtype=torch.int64)
                self._shape_sends.append(dist.isend(shape, peer, group=self.pp_group, tag=send_tag))
            buffer = torch.empty(3, device=device, dtype=torch.int64) if recv else None
            if recv:
                requests.append(dist.irecv(buffer, peer, group=self.pp_group, tag=recv_tag))
            received.append(buffer)
        for request in requests:
            request.wait()
        self._shape_sends = [r for r in self._shape_sends if not r.is_completed()]
        recv_next_shape, recv_prev_shape = ([0, 0, 0] if t is None else t.tolist() for t in received)
        return recv_prev_shape, recv_next_shape


def interleaved_schedule_kwargs(config) -> dict:
    """Arguments for megatron-core's interleaved schedule: our communicator, and the default process groups (the
    schedule takes both or neither)."""
    groups = ProcessGroupCollection.use_mpu_process_groups(["tp", "cp", "embd", "pos_embd", "pp", "dp_cp"])
    return dict(p2p_communicator=InterleavedP2PCommunicator(ps.get_pipeline_model_parallel_group(), config),
                pg_collection=groups)
