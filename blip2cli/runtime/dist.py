"""Process-group helpers that also work in a single plain process (world size 1, no group)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(with_deepspeed: bool = True) -> torch.device:
    """Join the process group when launched by DeepSpeed or torchrun (a plain process stays alone); this
    rank's device.

    Without ``with_deepspeed`` the group is torch's own (no DeepSpeed logging on stdout).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if with_deepspeed:
            import_deepspeed().init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend, init_method="env://")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def import_deepspeed():
    """``deepspeed``, told not to build the shared-memory op its CPU backend compiles at process-group setup.

    Only DeepSpeed's inference all-reduce uses that op, never training; its just-in-time compile takes minutes,
    a compile killed midway leaves a lock file on which every later launch waits forever, and each rank of
    each launch leaves a 66 MB buffer in ``/dev/shm``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient."""
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may use every rank's rows
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to the owning rank."""
    return x if world_size() == 1 else _GatherWithGrad.apply(x)


def _comm_device() -> torch.device:
    """Where collective tensors must live: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_all(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks."""
    if world_size() == 1:
        return x.detach()
    x = x.detach().clone().to(_comm_device())
    dist.all_reduce(x)
    return x.cpu()


def broadcast_text(text: str | None, src: int = 0) -> str | None:
    """``text`` of rank ``src`` on every rank (None stays None), sent as bytes: nothing is unpickled."""
    if world_size() == 1:
        return text
    device = _comm_device()
    data = torch.tensor(list(text.encode()) if text is not None else [], dtype=torch.uint8)
    size = torch.tensor([len(data) if text is not None else -1], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if int(size) < 0:
        return None
    buf = data.to(device) if rank() == src else torch.empty(int(size), dtype=torch.uint8, device=device)
    if int(size):
        dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes().decode()


def first_error(error: str | None) -> str | None:
    """Every rank's view of the lowest-ranked rank's error message (None when no rank has one)."""
    if world_size() == 1:
        return error
    device = _comm_device()
    failed = torch.tensor([rank() if error is not None else world_size()], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    src = int(failed)
    return None if src == world_size() else broadcast_text(error, src)
