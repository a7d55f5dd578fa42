"""The parallelism planner (nanoseek.parallel.planner): V3 Table 2's formulas, the bubble torch's own
pipeline schedules run (counted from their per-rank action orders), the CLI and impossible layouts."""
import pytest

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.parallel import planner
from nanoseek.parallel.planner import (
    Cluster,
    Layout,
    activation_multiplier,
    bubble,
    parameter_multiplier,
    peak_activations,
    pipeline_order,
    simulate_bubble,
    table2,
)


@pytest.mark.parametrize("PP,F,B,W,FB", [(16, 1.0, 2.0, 1.0, None), (8, 2.0, 3.0, 1.0, 4.0), (4, 1.5, 2.5, 0.5, 3.5)])
def test_table2_formulas_symbolically_and_numerically(PP, F, B, W, FB):
    rows = {name: (bub, par, act) for name, bub, par, act in table2(PP, F, B, W, FB)}
    assert [(n, b.text, p.text, a.text) for n, (b, p, a) in rows.items()] == [
        ("1F1B", "(PP−1)(F+B)", "1x", "PP"),
        ("ZB1P", "(PP−1)(F+B−2W)", "1x", "PP"),
        ("DualPipe", "(PP/2−1)(F&B+B−3W)", "2x", "PP+1")]
    fb = F + B if FB is None else FB
    assert rows["1F1B"][0].value == (PP - 1) * (F + B)
    assert rows["ZB1P"][0].value == (PP - 1) * (F + B - 2 * W)
    assert rows["DualPipe"][0].value == (PP / 2 - 1) * (fb + B - 3 * W)
    assert [r[1].value for r in rows.values()] == [1, 1, 2]
    assert [r[2].value for r in rows.values()] == [PP, PP, PP + 1]


# Units: F = W = 1 and B = I + W = 2 (the input and the weight gradient each cost a forward); F&B = F + B
# (one device computes the overlapped pair; the overlap hides communication) or less.
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev"])
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 12), (8, 16)])
def test_torch_schedules_run_the_planned_bubble(schedule, pp, m):
    order = pipeline_order(schedule, pp, m)
    assert sorted(order) == list(range(pp))
    stages = planner.num_stages(schedule, pp)
    expected = bubble(schedule, stages, F=1, B=2, W=1).value
    assert simulate_bubble(order, F=1, I=1, W=1) == dict.fromkeys(range(pp), expected)
    # the busiest rank holds the planned activations (chunks of one micro-batch)
    assert max(peak_activations(a) for a in order.values()) == activation_multiplier(schedule, stages, m).value
    # other chunk times: 1F1B-style schedules keep (PP−1)(F+B) on every rank, ZBV (PP/2−1)(F+B−2W)
    if schedule != "dualpipev":
        got = simulate_bubble(order, F=2, I=3, W=1)
        assert max(got.values()) == bubble(schedule, stages, F=2, B=4, W=1).value
    else:  # an overlapped pair cheaper than F+B: Table 2's DualPipe bubble is the busiest rank's
        got = simulate_bubble(order, F=1, I=1, W=1, FB=2)
        assert max(got.values()) == bubble(schedule, stages, F=1, B=2, W=1, FB=2).value


def test_dualpipev_bubble_does_not_grow_with_microbatches():
    # V3 §3.2.1: neither DualPipe's bubble nor its activation memory grows with the micro-batch count
    for m in (8, 16, 32):
        order = pipeline_order("dualpipev", 4, m)
        assert set(simulate_bubble(order).values()) == {6.0}
        assert max(peak_activations(a) for a in order.values()) == 9


def test_pipeline_order_rejects_paper_only_schedules():
    with pytest.raises(ValueError, match="not a torch.distributed.pipelining schedule"):
        pipeline_order("dualpipe", 4, 8)


def test_v3_layout_on_v3_cluster():
    cfg = ModelConfig.preset("deepseek-v3")
    pl = planner.plan(cfg, Cluster(), Layout(pp=16, ep=64, zero=1, schedule="dualpipe", microbatches=32))
    assert pl.dp == 128 and pl.bubble.text == "(PP/2−1)(F&B+B−3W)"
    assert set(pl.comm) >= {"dispatch+combine (IB)", "dispatch+combine (NVLink)", "dense reduce-scatter",
                            "pipeline send/recv"}
    # node-limited routing: a token reaches at most M = 4 of EP64's 8 nodes over IB; M = 8 (off) doubles it
    wide = planner.plan(cfg, Cluster(), Layout(pp=16, ep=64, schedule="dualpipe", microbatches=32, max_nodes=None))
    assert wide.comm["dispatch+combine (IB)"][0] == 2 * pl.comm["dispatch+combine (IB)"][0]
    # ZeRO stages shard more: 1 optimizer state, 2 + gradients, 3 + parameters
    mem = [planner.plan(cfg, Cluster(), Layout(zero=z)).memory for z in (1, 2, 3)]
    assert mem[0]["optimizer"] == mem[1]["optimizer"] == mem[2]["optimizer"]
    assert mem[0]["gradients"] > mem[1]["gradients"] == mem[2]["gradients"]
    assert mem[1]["parameters"] > mem[2]["parameters"]


def test_cli_plan_deepseek_v3(capsys):
    main(["plan", "--model", "deepseek-v3"])
    out = capsys.readouterr().out
    for text in ("pp=16 (dualpipe, 16 stages, 120 micro-batches", "ep=64", "dp=128 (ZeRO-1)", "M=4 nodes", "2048 GPUs", "(PP/2−1)(F&B+B−3W)",
                 "parameters 2x", "activations PP+1 = 17", "optimizer", "dispatch+combine (IB)", "FP32 master"):
        assert text in out, text
    main(["plan", "--table2", "--pp", "16"])
    out = capsys.readouterr().out
    assert "(PP−1)(F+B) = 45" in out and "(PP−1)(F+B−2W) = 15" in out and "(PP/2−1)(F&B+B−3W) = 14" in out


def test_cli_search_ranks_layouts_that_fit(capsys):
    main(["plan", "--model", "small-v3", "--gpus", "8", "--pp", "2", "--schedule", "1f1b", "--ep", "4",
          "--zero", "3", "--precision", "fp32", "--seq-len", "1024", "--global-batch", "32"])
    assert "pp=2 (1f1b, 2 stages, 8 micro-batches" in capsys.readouterr().out
    main(["plan", "--model", "small-v3", "--gpus", "8", "--memory-gb", "4", "--seq-len", "1024", "--search",
          "--global-batch", "64", "--schedules", "1f1b,dualpipev", "--top", "5"])
    out = capsys.readouterr().out
    assert "layouts that fit" in out and len(out.split("fastest estimated step first:")[1].splitlines()) >= 3
    plans = planner.search(ModelConfig.preset("small-v3"), Cluster(gpus=8, memory_gb=4), seq_len=1024, global_batch=64,
                           schedules=("1f1b", "dualpipev"))
    assert all(p.fits for p in plans) and [p.step_s for p in plans] == sorted(p.step_s for p in plans)


@pytest.mark.parametrize("layout,match", [
    (Layout(schedule="dualpipe", pp=15, ep=1, microbatches=30), "pp=15 must be even"),
    (Layout(schedule="dualpipev", pp=8, microbatches=31), "microbatches=31 must be even"),
    (Layout(schedule="dualpipev", pp=8, microbatches=8), "must be >= the 16 stages"),
    (Layout(ep=3), "ep=3 does not divide n_routed_experts=256"),
    (Layout(pp=3, schedule="1f1b"), "pp=3 does not divide gpus=2048"),
    (Layout(pp=64, schedule="1f1b", ep=32), "cuts 64 stages from 61 layers"),
    (Layout(schedule="pipedream"), "schedule='pipedream'; allowed"),
])
def test_impossible_layouts_fail_clearly(layout, match):
    with pytest.raises(ValueError, match=match):
        planner.plan(ModelConfig.preset("deepseek-v3"), Cluster(), layout)


def test_search_without_a_fit_and_cli_errors(capsys):
    with pytest.raises(ValueError, match="no layout of .* fits in memory_gb=1"):
        planner.search(ModelConfig.preset("deepseek-v3"), Cluster(gpus=16, memory_gb=1))
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "deepseek-v3", "--ep", "3"])
    assert e.value.code == 2 and "ep=3 does not divide" in capsys.readouterr().err
    assert parameter_multiplier("1f1b").text == "1x"
