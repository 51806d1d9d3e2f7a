"""Two gloo ranks with batch B compute the loss and gradient of one process with batch 2B."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.tiny_tasks import B, forward_backward, stage1_task, stage2_task, tiny_batch


def _worker(rank: int, world: int, which: str, hf_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no port to race for with other processes on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    task = stage1_task(hf_dir) if which == "stage1" else stage2_task(hf_dir)
    full = tiny_batch(world * B)
    part = {"image": full["image"][rank * B:(rank + 1) * B], "text": full["text"][rank * B:(rank + 1) * B]}
    losses, grads = forward_backward(task, part)
    for g in grads.values():  # what DDP / ZeRO do: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    losses = {k: v.clone() for k, v in losses.items()}
    for k, v in losses.items():
        dist.all_reduce(v)
        if k != "tokens":  # the losses are means over the batch; the text tokens add up
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
        from tests import tiny

        hf_dir = str(tmp_path / "bert")
        tiny.bert_tokenizer().save_pretrained(hf_dir)
    mp.spawn(_worker, args=(2, which.split("-")[0], hf_dir, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "dist.pt")
    task = stage1_task(hf_dir) if which == "stage1" else stage2_task(hf_dir)
    losses, grads = forward_backward(task, tiny_batch(2 * B))
    for k in losses:
        torch.testing.assert_close(got["losses"][k], losses[k], atol=1e-5, rtol=1e-5, msg=k)
    assert set(got["grads"]) == set(grads)
    for name, g in grads.items():  # relative to the gradient's size: magnitudes vary widely between tensors
        assert (got["grads"][name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name
