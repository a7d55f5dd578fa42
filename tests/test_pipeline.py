"""Pipeline parallelism (issue 14, first step): the model cut into stages computes what the whole model does,
and PyTorch's 1F1B and DualPipeV schedules over those stages on 2 gloo ranks give the one-process loss and
gradients of the same global batch (MTP depth 1 and the sequence-wise balance loss on), also with 2-way expert
parallelism inside each stage (pp = 2 x ep = 2 on 4 ranks)."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV
from torch.distributed.tensor import DTensor

from nanoseek.config import ModelConfig
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.parallel.expert import shard_experts
from nanoseek.parallel.launch import run_ranks
from nanoseek.parallel.pipeline import build_stages, prune, split_layers, stages_of_rank
from nanoseek.pretrain.losses import lm_losses, total_loss

S, D, B, MTP_WEIGHT = 16, 1, 8, 0.3


def tiny_model() -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-v3").replace(num_hidden_layers=4, seq_aux_alpha=0.01, tie_word_embeddings=False)
    return DeepSeekForCausalLM(cfg)


def windows() -> torch.Tensor:
    return torch.randint(300, (B, S + 1 + D), generator=torch.Generator().manual_seed(1))


class _Out:  # what lm_losses reads from a model output
    def __init__(self, outputs):
        self.logits, self.mtp_logits = outputs[0], list(outputs[1:-1])


def loss_fn(outputs, window):
    main, mtp = lm_losses(_Out(outputs), window, S)
    return total_loss(main, mtp, MTP_WEIGHT, outputs[-1].sum())


def test_split_and_placement():
    assert split_layers(7, 3) == [range(3), range(3, 5), range(5, 7)]
    assert split_layers(4, 2, [1, 3]) == [range(1), range(1, 4)]
    with pytest.raises(ValueError, match="pp_layers"):
        split_layers(4, 2, [1, 2])
    assert [stages_of_rank(r, 4, "dualpipev") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [stages_of_rank(r, 2, "interleaved-1f1b") for r in range(2)] == [[0, 2], [1, 3]]
    assert stages_of_rank(1, 2, "1f1b") == [1]


def test_chained_stages_compute_the_whole_model():
    model = tiny_model().train()
    ids = windows()[:, :S + D]
    out = model(ids)
    x = (ids,)
    for stage in build_stages(model, [0, 1, 2, 3], 4):
        x = stage(*x)
    assert torch.equal(x[0], out.logits) and torch.equal(x[1], out.mtp_logits[0])
    assert torch.allclose(x[-1].sum(), out.aux_loss, rtol=1e-6, atol=0)


def one_process() -> tuple[float, dict]:
    model = tiny_model().train()
    w = windows()
    out = model(w[:, :S + D])
    main, mtp = lm_losses(out, w, S)
    loss = total_loss(main, mtp, MTP_WEIGHT, out.aux_loss)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def pipeline_worker(rank, world, schedule_name, microbatches, ep=1):
    """One optimizer step's forward and backward on pp = world / ep ranks (x ep expert-parallel ranks, which
    are data-parallel too: each takes its half of the batch, and the gradients are averaged over them)."""
    model = tiny_model().train()
    pp = world // ep
    mesh = init_device_mesh("cpu", (pp, ep), mesh_dim_names=("pp", "ep"))
    pp_rank, ep_rank = mesh["pp"].get_local_rank(), mesh["ep"].get_local_rank()
    n_stages = pp * (2 if schedule_name == "dualpipev" else 1)
    indices = stages_of_rank(pp_rank, pp, schedule_name)
    stages = build_stages(model, indices, n_stages)
    prune(model, stages)
    if ep > 1:
        for stage in stages:
            for m in stage.modules():
                if isinstance(m, MoE):
                    shard_experts(m, mesh["ep"])
    pipe = [PipelineStage(s, i, n_stages, torch.device("cpu"), group=mesh["pp"].get_group())
            for s, i in zip(stages, indices)]
    if schedule_name == "dualpipev":
        schedule = ScheduleDualPipeV(pipe, microbatches, loss_fn=loss_fn)
    else:
        schedule = Schedule1F1B(pipe[0], microbatches, loss_fn=loss_fn)
    w = windows().chunk(ep)[ep_rank]
    losses = []
    first, last = any(s.first for s in stages), any(s.last for s in stages)
    schedule.step(*((w[:, :S + D],) if first else ()), target=w if last else None, losses=losses)
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad.clone()
        if isinstance(p.grad, DTensor):  # this rank's experts: their gradient sums both halves of the batch
            g = g / ep
        else:
            dist.all_reduce(g, group=mesh["ep"].get_group())
            g = g / ep
        grads[n] = (g, ep_rank if isinstance(p.grad, DTensor) else None)
    loss = torch.stack(losses).mean() if last else torch.zeros(())
    if last:
        dist.all_reduce(loss, group=mesh["ep"].get_group())
    return {"loss": loss.item() / ep if last else None, "grads": grads}


@pytest.mark.parametrize("schedule, world, ep", [("1f1b", 2, 1), ("dualpipev", 2, 1), ("1f1b", 4, 2)])
def test_pipelined_step_matches_one_process(schedule, world, ep):
    loss, grads = one_process()
    ranks = run_ranks(pipeline_worker, world, (schedule, 4 // ep, ep), timeout=120)
    got = [r["loss"] for r in ranks if r["loss"] is not None]
    assert len(got) == ep and all(g == pytest.approx(loss, rel=1e-5) for g in got)
    merged = {}
    for r in ranks:  # each parameter's gradient: from the rank holding it (experts: its slice of each)
        for n, (g, part) in r["grads"].items():
            if part is None:
                merged[n] = g
            else:
                merged.setdefault(n, [None] * ep)[part] = g
    merged = {n: torch.cat(g) if isinstance(g, list) else g for n, g in merged.items()}
    assert sorted(merged) == sorted(grads)  # every parameter got its gradient on exactly one rank
    a = torch.cat([grads[n].flatten() for n in sorted(grads)]).double()
    b = torch.cat([merged[n].flatten() for n in sorted(grads)]).double()
    assert 1 - torch.nn.functional.cosine_similarity(a, b, dim=0) < 1e-6
    for n in grads:
        assert torch.allclose(merged[n], grads[n], rtol=1e-4, atol=1e-7), n
