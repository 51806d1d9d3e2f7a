"""Two gloo ranks with batch B compute the loss and gradient of one process with batch 2B."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip2cli.train.tasks import Stage1Loss, Stage1Task, Stage2Loss, Stage2Task

from .test_losses import _batch, _tiny_stage1

B = 3


def _stage1_task(tokenizer_dir: str):
    from transformers import AutoTokenizer

    # a tokenizer trained once and saved: training is not deterministic across processes
    net, tok = _tiny_stage1(AutoTokenizer.from_pretrained(tokenizer_dir))
    net.vision.requires_grad_(False)
    return Stage1Task(net, tok, Stage1Loss(max_txt_len=16)).eval()  # eval: no dropout, comparable runs


def _stage2_task(hf_dir):
    from blip2cli.models.checkpoints import load_hf_dir

    ckpt = load_hf_dir(hf_dir)
    for m in ckpt.net.frozen_modules():
        m.requires_grad_(False)
    return Stage2Task(ckpt.net, ckpt.tokenizer, Stage2Loss()).eval()


def _grads(task) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def _run(task, batch, step=5):
    out = task(batch, step=step)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(task)


def _worker(rank: int, world: int, which: str, hf_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no port to race for with other processes on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    task = _stage1_task(hf_dir) if which == "stage1" else _stage2_task(hf_dir)
    full = _batch(world * B)
    part = {"image": full["image"][rank * B:(rank + 1) * B], "text": full["text"][rank * B:(rank + 1) * B]}
    losses, grads = _run(task, part)
    for g in grads.values():  # what DDP / ZeRO do: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    losses = {k: v.clone() for k, v in losses.items()}
    for v in losses.values():
        dist.all_reduce(v)
        v /= world
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    dist.barrier()  # neither rank tears the group down while the other still talks to it
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort a finished process


@pytest.mark.distributed
@pytest.mark.parametrize("which", ["stage1", "stage2-opt", "stage2-t5"])
def test_two_ranks_equal_one_process(which, tmp_path, hf_opt, hf_t5):
    hf_dir = str(hf_t5 if which == "stage2-t5" else hf_opt)
    if which == "stage1":
        from . import tiny

        hf_dir = str(tmp_path / "bert")
        tiny.bert_tokenizer().save_pretrained(hf_dir)
    mp.spawn(_worker, args=(2, which.split("-")[0], hf_dir, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "dist.pt")
    task = _stage1_task(hf_dir) if which == "stage1" else _stage2_task(hf_dir)
    losses, grads = _run(task, _batch(2 * B))
    for k in losses:
        torch.testing.assert_close(got["losses"][k], losses[k], atol=1e-5, rtol=1e-5, msg=k)
    assert set(got["grads"]) == set(grads)
    for name, g in grads.items():  # relative to the gradient's size: magnitudes vary widely between tensors
        assert (got["grads"][name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name
