"""Multi-process training with ``torchrun`` (torch.distributed): one process per device, ``nccl`` on CUDA and
``gloo`` on the CPU.

What each training step does under several processes (the same as DistributedDataParallel does for a plain
``forward``, written out because both stages run several forwards and optimizers per step):

* every rank starts from rank 0's weights and buffers (:func:`broadcast_state`), and each rank reads its own share
  of every epoch (:class:`utils.run_state.EpochSampler` with ``rank``/``num_replicas``);
* after ``backward``, gradients are averaged over the ranks (:func:`average_gradients`) before the optimizer step,
  so all ranks take the same step and hold identical parameters;
* after the step, the batch-norm running statistics are taken from rank 0, as DDP's ``broadcast_buffers`` does;
* logging, tensorboard, validation and checkpoints happen on rank 0 only. ``--batch_size`` is per process.

A single process (no ``WORLD_SIZE`` in the environment) uses none of this.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def init_distributed(device_flag: Optional[str] = None) -> Optional[torch.device]:
    """Join the process group when started by torchrun; returns this process's device (None when not distributed).

    ``LOCAL_RANK`` picks the CUDA device; ``--device cpu`` (or no CUDA) uses gloo on the CPU.
    """
    if not launched_by_torchrun():
        return None
    if dist.is_initialized():
        return _device_of(device_flag)
    device = _device_of(device_flag)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return device


def _device_of(device_flag: Optional[str]) -> torch.device:
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device_flag == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device(f'cuda:{local_rank}')


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def broadcast_norm_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s batch-norm running statistics to every rank (what DDP's ``broadcast_buffers`` keeps in
    step); the other buffers of these models do not change during training."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._NormBase):
                for tensor in norm.buffers():
                    dist.broadcast(tensor.data, src=src)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``parameters`` over the ranks (missing gradients count as 0)."""
    size = world_size()
    if size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        count = g.numel()
        value = flat[offset:offset + count].view_as(g)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        offset += count


def all_gather_objects(obj) -> List:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def parameter_checksum(module: torch.nn.Module) -> float:
    """A float64 sum of every parameter: equal on all ranks when the ranks hold the same weights."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class SyncCheck:
    """Every ``every`` steps under torchrun, check that all ranks hold the same parameters (a float64 checksum per
    rank) and log it on rank 0; a mismatch stops the run."""

    def __init__(self, module: torch.nn.Module, every: int, logger=None):
        self.module, self.every, self.logger, self.steps = module, max(1, int(every)), logger, 0

    def after_step(self) -> None:
        self.steps += 1
        if world_size() == 1 or self.steps % self.every:
            return
        sums = all_gather_objects(parameter_checksum(self.module))
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks hold different weights after step {self.steps}: checksums {sums}")
        if self.logger is not None:
            self.logger.info(f"[ddp] {len(sums)} ranks hold identical weights (checksum {sums[0]:.10g})")


def convert_sync_batchnorm(model: torch.nn.Module, enabled: bool, device: torch.device) -> torch.nn.Module:
    """``--sync_bn True``: batch-norm statistics computed over the batches of all processes (CUDA only; the
    state_dict names stay the same). Without it each process normalises with its own batch, as DDP does."""
    if not enabled:
        return model
    if device.type != 'cuda':
        raise ValueError("--sync_bn True needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); on the CPU "
                         "each process normalises with its own batch and takes rank 0's running statistics")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
