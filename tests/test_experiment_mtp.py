"""The `mtp` experiment: matched budgets, and its speculative-decoding measurement against an independent count."""
from __future__ import annotations

from dataclasses import replace

import infer_fixtures
import pytest
import torch

import nanoseek
from nanoseek.experiments import get
from nanoseek.experiments.core import matched_errors
from nanoseek.experiments.mtp import (
    FULL,
    QUICK,
    MTPExperiment,
    draft_agreement,
    post_config,
    speculative_decoding,
)


@pytest.mark.parametrize("quick", [True, False])
def test_variants_are_matched(quick):
    exp = get("mtp")
    variants = exp.variants(quick)
    assert [v.name for v in variants] == ["mtp-0", "mtp-1", "mtp-2"]
    assert not matched_errors(variants, exp.matched_on)
    # MTP modules are left out of the parameter count, as in V3's ablation: every depth has the same main model
    assert len({v.matched["params"] for v in variants}) == 1
    perturbed = [replace(v, matched={**v.matched, "tokens": v.matched["tokens"] * 1.05}) if v.name == "mtp-1" else v
                 for v in variants]
    assert any("tokens" in e for e in matched_errors(perturbed, exp.matched_on))


def test_plans_make_valid_post_configs(tmp_path):
    for plan in (QUICK, FULL):
        cfg = post_config(tmp_path / "model", plan.post, seed=1, threads=1)
        assert cfg.train.steps * cfg.train.batch_size == plan.post.examples
        assert cfg.task.options["digits"] == plan.post.digits and cfg.model.init_from == str(tmp_path / "model")
    checks = {(c.metric, c.kind) for c in MTPExperiment.checks}
    assert checks == {("val_bpb", "not_worse"), ("accuracy", "greater"), ("acceptance", "above"), ("agreement", "above")}


def simulated_counts(model, prompt: list[int], generated: list[int]) -> tuple[int, int]:
    """(drafted, accepted) of greedy MTP speculation, replayed from one teacher-forced forward of the whole
    sequence: with the newest token at position j, the draft for j + 1 is MTP module 1's argmax at j - 1
    (h_{j-1} and token j); it is accepted iff it equals the greedy token j + 1, and then token j + 2 comes
    from the same forward."""
    x = torch.tensor([prompt + generated])
    with torch.no_grad():
        drafts = model(x, mtp=True).mtp_logits[0][0].argmax(-1)  # position i predicts token i + 2
    P, N = len(prompt), len(generated)
    j, drafted, accepted = P - 1, 0, 0
    while j - (P - 1) < N:
        drafted += 1
        if int(drafts[j - 1]) == int(x[0, j + 1]):
            accepted += 1
            j += 2
        else:
            j += 1
    return drafted, accepted


def _independent(model, prompts, new_tokens):
    drafted = accepted = 0
    for p in prompts:
        out = nanoseek.generate(model, [p], max_new_tokens=new_tokens, stop_tokens=[])[0]
        d, a = simulated_counts(model, p, out)
        drafted, accepted = drafted + d, accepted + a
    return accepted / drafted


def test_acceptance_matches_an_independent_count_on_a_random_model():
    """A random 8-token model: drafts are both accepted and rejected, and the measured rate equals the replay."""
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset(
        "tiny-v3", vocab_size=8, initializer_range=0.3, eos_token_id=None)).eval()
    prompts = [[1, 2, 3, 4], [5, 6, 7], [0, 3]]
    result = speculative_decoding(model, prompts, 40, reps=0)
    assert result["identical"] == 1.0 and result["generated"] == 3 * 40
    assert 0.0 < result["acceptance"] < 1.0
    assert result["acceptance"] == pytest.approx(_independent(model, prompts, 40), abs=1e-12)
    assert "speedup" not in result


def test_perfect_drafts_on_a_fixed_successor_pattern():
    """A model whose main head and MTP module learned a successor table: every draft accepted, two tokens per
    forward, identical outputs, as the replay counts; the timed rounds report a positive speed-up."""
    model, cycle, _ = infer_fixtures.pattern_model()
    prompts = [cycle[i:i + 3].tolist() for i in (0, 10, 20)]
    result = speculative_decoding(model, prompts, 40, reps=1)
    assert result["identical"] == 1.0
    assert result["acceptance"] == _independent(model, prompts, 40) == 1.0
    assert result["tokens_per_forward"] == pytest.approx(2.0, abs=0.05)
    assert result["speedup"] > 0 and result["spec_tok_s"] > 0 and result["plain_tok_s"] > 0
    # teacher-forced along the pattern itself, the drafts equal the main model's greedy tokens everywhere
    text = cycle.repeat(2)
    assert draft_agreement(model, text, seq_len=32) == 1.0


def test_draft_agreement_counts_positions():
    """On a random model the agreement is the share of positions i where MTP module 1's argmax equals the main
    model's argmax at i + 1, counted here one window at a time."""
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset(
        "tiny-v3", vocab_size=8, initializer_range=0.3, eos_token_id=None)).eval()
    tokens = torch.randint(0, 8, (3 * 16 + 5,))
    agree = 0
    with torch.no_grad():
        for w in tokens[:48].view(3, 16):
            out = model(w[None], mtp=True)
            agree += sum(int(out.mtp_logits[0][0, i].argmax()) == int(out.logits[0, i + 1].argmax()) for i in range(15))
    assert 0 < agree < 45
    assert draft_agreement(model, tokens, seq_len=16, batch_size=2) == pytest.approx(agree / 45)
