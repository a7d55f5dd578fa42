"""Data and expert parallelism (issue 13): each layout, run on gloo ranks, against one process training the
same config on the same global batch (DualPipe's style of check): per-step losses within 1e-5 relative,
step-1 gradients with cosine distance < 1e-6, router biases identical on every rank and equal to the
single process's; sharded checkpoints that resume on another number of ranks; clear layout errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import stdlib_dataset
from torch.distributed.tensor import DTensor

from nanoseek.config import ModelConfig
from nanoseek.parallel.launch import run_ranks
from nanoseek.parallel.mesh import ParallelDims
from nanoseek.pretrain.config import PretrainConfig
from nanoseek.pretrain.trainer import Pretrainer, pretrain
from nanoseek.train.config import ParallelSection
from nanoseek.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return stdlib_dataset(tmp_path_factory.mktemp("parallel-data"), max_bytes=120_000, val_fraction=0.05)


def config(dataset, *sets) -> list[str]:
    return [f"data.dataset={json.dumps(str(dataset))}", "train.threads=1", "log.progress=false",
            "log.tensorboard=false", "train.steps=5", "train.batch_size=8", "data.seq_len=32", "eval.batches=3",
            "eval.batch_size=2", "checkpoint.every=0", "train.spike_factor=0", "schedule.warmup_steps=2",
            *sets]


class Probe(Pretrainer):
    """Pretraining that keeps the step-1 gradients (gathered whole) and, as a test of routing, starts with
    the experts of the second half of layer 1's router pushed out of reach (they and, under ep = 2, the
    rank holding them receive no tokens)."""

    def setup(self):
        super().setup()
        gate = self.model.moe_layers()[0].gate
        E = gate.e_score_correction_bias.numel()
        gate.e_score_correction_bias[E // 2:] = -10.0

    def optimizer_step(self, loss=None):
        if self.step == 0:
            self.grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                          for n, p in self.model.named_parameters()}
        return super().optimizer_step(loss)


def train(sets: list[str], out: str, resume: bool = False) -> dict:
    trainer = Probe(PretrainConfig.load(TINY, sets), out, resume=resume, progress=False)
    trainer.run()
    return {"losses": [r["loss"] for r in read_metrics(out) if r.get("loss") is not None],
            "grads": getattr(trainer, "grads", None),
            "biases": {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("correction_bias")},
            "val_loss": next(r["val_loss"] for r in reversed(read_metrics(out)) if "val_loss" in r)}


def rank_worker(rank, world, sets, out, resume=False):
    return train(sets, out, resume)


def check_equivalent(single: dict, ranks: list[dict], val: bool = True) -> None:
    """Per-step losses, step-1 gradients (each parameter from the ranks holding it: pipeline ranks hold some),
    router biases on every rank, held-out loss."""
    ref = torch.tensor(single["losses"], dtype=torch.float64)
    for r in ranks:
        got = torch.tensor(r["losses"], dtype=torch.float64)
        assert len(got) == len(ref) >= 5
        assert torch.allclose(got, ref, rtol=1e-5, atol=0), (got, ref)
        assert r["biases"] and all(torch.equal(b, single["biases"][n]) for n, b in r["biases"].items())
    merged = {n: g for r in ranks for n, g in r["grads"].items()}
    assert sorted(merged) == sorted(single["grads"])
    a = torch.cat([g.flatten() for g in single["grads"].values()]).double()
    b = torch.cat([merged[n].flatten() for n in single["grads"]]).double()
    assert 1 - torch.nn.functional.cosine_similarity(a, b, dim=0) < 1e-6
    if val:  # (pipelined evaluation feeds the training shape: windows of S + 1 + D tokens, another held-out set)
        assert ranks[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


# V2 token dropping, decided per simulated device in one process and on the receiving rank under EP: the same
# decision when no sequence is protected (each rank would protect its own first ones) and the ep ranks'
# micro-batches together are the one process's
DROPPING = ["model.overrides.ep_size=2", "balance.capacity_factor=1.0", "balance.no_drop_fraction=0"]
PIPELINE = ["model.overrides.num_hidden_layers=4", "parallel.microbatches=4"]


@pytest.mark.parametrize("world, layout, common", [
    (2, ["parallel.dp_shard=2"], []),  # FSDP2
    (2, ["parallel.ep=2"], []),  # EP: each rank 4 of the 8 experts; rank 1's receive no tokens in layer 1
    (4, ["parallel.ep=2"], []),  # 2-way EP x 2-way FSDP of the experts (dp_shard = 4)
    (4, ["parallel.dp_replicate=2", "parallel.ep=2"], []),  # HSDP: 2 replicas of 2-way FSDP + EP
    (2, ["parallel.ep=2"], DROPPING),
    # pipeline parallelism (MTP depth 1 and the sequence-wise balance loss on, as everywhere here)
    (2, ["parallel.pp=2"], PIPELINE),  # 1F1B, 4 micro-batches
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"], PIPELINE),  # 4 stages in a V, 4 micro-batches
    (4, ["parallel.pp=2", "parallel.ep=2", "parallel.microbatches=2"], PIPELINE),  # pp 2 x (dp 2 = ep 2)
    (4, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.ep=2"], PIPELINE),  # DualPipeV x FSDP x EP
])
def test_layout_matches_single_process(dataset, tmp_path, world, layout, common):
    sets = config(dataset, *common)
    single = train(sets, str(tmp_path / "single"))
    assert single["biases"]["model.layers.1.mlp.gate.e_score_correction_bias"][4:].max() < -9  # out of reach
    ranks = run_ranks(rank_worker, world, (sets + layout, str(tmp_path / "ranks")), timeout=180)
    check_equivalent(single, ranks, val="parallel.pp=2" not in layout)
    if "parallel.ep=2" in layout:
        sent = [r["alltoall_bytes"] for r in read_metrics(tmp_path / "ranks") if "loss" in r]
        assert len(sent) == 5 and all(b > 0 for b in sent)
    if common == DROPPING:
        dropped = [r["dropped_fraction"] for r in read_metrics(tmp_path / "ranks") if "loss" in r]
        assert all(0 < d < 0.5 for d in dropped)  # (capacity 1.0 with experts 4-7 out of reach in layer 1)


@pytest.mark.parametrize("layout, common", [
    (["parallel.dp_shard=2"], []),
    (["parallel.dp_shard=2"], ["optim.moments_dtype=bf16"]),  # BF16 moments as sharded DTensors, resharded
    (["parallel.pp=2"], PIPELINE),
])
def test_sharded_checkpoint_resumes_on_another_number_of_ranks_and_exports_hf(dataset, tmp_path, layout, common):
    from nanoseek.interop.hf import load_pretrained

    sets = config(dataset, *common)
    whole = train(sets, str(tmp_path / "whole"))
    out = str(tmp_path / "run")
    run_ranks(rank_worker, 2, (sets + layout + ["train.steps=3"], out), timeout=120)
    state = json.loads((Path(out) / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    exported = load_pretrained(Path(out) / "model")  # gathered on rank 0 into the HF layout
    assert exported.model.layers[1].mlp.experts.gate_proj.shape[0] == exported.config.n_routed_experts
    resumed = train(sets, out, resume=True)  # saved by 2 ranks, resumed by one process
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"]), rtol=1e-5, atol=0)
    for n, b in resumed["biases"].items():
        assert torch.equal(b, whole["biases"][n])


@pytest.mark.parametrize("section, world, model, message", [
    ({"dp_shard": 3}, 2, {}, "3 = 3 ranks, but the job has 2"),
    ({"dp_replicate": 3}, 4, {}, "dp_replicate = 3 does not divide the 4 data-parallel ranks"),
    ({"ep": 3}, 4, {}, "parallel.ep = 3 must divide parallel.dp_shard = 4"),
    ({"ep": 8}, 8, {"n_routed_experts": 12}, "must divide the model's n_routed_experts = 12"),
    ({"ep": 2}, 2, {"topk_devices": 1, "ep_size": 4}, "ep_size = 4 .* must equal parallel.ep = 2"),
    ({"ep": 2}, 2, {"n_routed_experts": 0}, "needs a model with routed experts"),
])
def test_impossible_layouts_fail_naming_the_fields(section, world, model, message):
    cfg = ModelConfig.preset("tiny-v3").replace(**model) if model else ModelConfig.preset("tiny-v3")
    with pytest.raises(ValueError, match=message):
        ParallelDims.resolve(ParallelSection(**section), world, cfg)


def test_layouts_resolve():
    dims = ParallelDims.resolve(ParallelSection(dp_replicate=2, ep=2), 8, ModelConfig.preset("tiny-v3"))
    assert (dims.dp_replicate, dims.dp_shard, dims.ep, dims.efsdp, dims.world_size) == (2, 4, 2, 2, 8)
    # one process simulates ep_size devices for device-limited routing; it needs no ranks
    simulated = ModelConfig.preset("tiny-v3").replace(topk_devices=1, ep_size=4)
    assert ParallelDims.resolve(ParallelSection(), 1, simulated).ep == 1


def _children_with_rank(pid: int, rank: int) -> list[int]:
    """Worker processes torchrun (pid) started for `rank` (read from /proc: our own descendants only)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                env = (stat.parent / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) == parent:
                child = int(stat.parent.name)
                frontier.append(child)
                if f"RANK={rank}".encode() in env:
                    found.append(child)
    return found


@pytest.mark.slow
def test_torchrun_killed_rank_fails_clearly_and_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    sets = config(dataset, "train.steps=12", "checkpoint.every=3", "eval.batches=1")
    pretrain(PretrainConfig.load(TINY, sets), tmp_path / "whole")  # one process, uninterrupted
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole") if r.get("loss") is not None]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "nanoseek",
           "pretrain", "--config", str(TINY), "--out", str(out), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-00000006").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() is None, job.stdout.read()
        victims = _children_with_rank(job.pid, 1)
        assert victims
        os.kill(victims[0], signal.SIGKILL)
        output, _ = job.communicate(timeout=90)  # torchrun stops the other rank; nothing hangs
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(out) if r.get("loss") is not None]
    assert torch.allclose(torch.tensor(losses), torch.tensor(whole), rtol=1e-5, atol=0)
