"""The compiled decode step (nanoseek.infer.compiled): the eager engine's tokens, graphs reused across
batches, weights changed between batches (RL) followed, compile time reported. Traced with aot_eager (the
graphs Inductor would get, in seconds); Inductor itself runs in test_generate's transformers parity test. Sampled
tokens: the compiled selection draws the eager one's."""
import pytest
import torch

import nanoseek
from nanoseek.infer import compiled
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import Filters, SamplingParams, distributions, exponential

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30]]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")


def _tokens(engine, prompts, params):
    return [c.tokens for c in engine.generate(prompts, params)]


def test_compiled_rows_of_different_lengths_weights_changed_and_graphs_reused(aot_eager):
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    # rows leave at 3, 9 and 14 tokens: batch buckets 4 (3 rows padded), 2, 1
    params = [SamplingParams(max_new_tokens=n, stop_tokens=[]) for n in (3, 9, 14)]
    eager, fast = Engine(model, compile=False), Engine(model, compile=True)
    assert _tokens(fast, PROMPTS, params) == _tokens(eager, PROMPTS, params)
    assert fast.stats.compile_seconds > 0
    with torch.no_grad():  # an RL update between batches: in place, the version may not change (fused AdamW)
        for p in model.parameters():
            p.data.mul_(1.5)
    assert _tokens(fast, PROMPTS, params) == _tokens(eager, PROMPTS, params)
    assert fast.stats.compile_seconds == 0  # the same shapes: the same graphs


def test_batches_over_max_batch_decode_eagerly_then_compiled(aot_eager, monkeypatch):
    monkeypatch.setattr(compiled.CompiledDecoder, "max_batch", 2)
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    params = [SamplingParams(max_new_tokens=n, stop_tokens=[]) for n in (3, 9, 14)]  # 3 rows eager, then 2, 1
    for spec in (False, True):
        fast = Engine(model, compile=True, speculative=spec)
        assert _tokens(fast, PROMPTS, params) == _tokens(Engine(model, compile=False, speculative=spec), PROMPTS, params)
        assert fast.stats.compile_seconds > 0
    assert {k[1] for k in compiled._compiled[model]} == {"step", "draft"}  # (speculation drafts in a graph too)


def test_compile_option(monkeypatch):
    monkeypatch.delenv("NANOSEEK_COMPILE", raising=False)  # (conftest turns "auto" off for the suite)
    tiny = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3"))
    assert Engine(tiny).compile is False  # "auto": a tiny model decodes too few tokens to pay for a compile
    small = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("small-v3"))
    assert compiled.compile_pays(small) and not compiled.compile_pays(small.to(torch.bfloat16))
    monkeypatch.setenv("NANOSEEK_COMPILE", "1")
    assert Engine(tiny).compile is True
    assert Engine(tiny, compile=True).compile is True
    with pytest.raises(ValueError, match="compile"):
        Engine(tiny, compile="yes")
    assert [compiled.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_a_step_that_fails_to_compile_decodes_eagerly(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    params = SamplingParams(max_new_tokens=5, stop_tokens=[])
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = _tokens(Engine(model, compile=True), PROMPTS, params)
    assert out == _tokens(Engine(model, compile=False), PROMPTS, params)
    assert Engine(model, compile=True).new_batch().compiled is None  # (not tried again for this model)


def test_a_draw_is_what_multinomial_draws():
    """`select`'s draws (argmax(p / Exp(1)), the Exp(1) from the generators) are torch.multinomial's samples,
    and leave the generators where multinomial does: seeded sampling gives the tokens it always gave."""
    for B, V, seed in [(1, 269, 0), (8, 269, 1), (3, 1000, 2), (5, 7, 3)]:
        probs = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)).softmax(-1)
        probs[:, ::3] = 0
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(probs, 1, generator=g1)[:, 0]
        assert torch.equal((probs / exponential([g2] * B, V, "cpu")).argmax(-1), expected)
        assert torch.equal(g1.get_state(), g2.get_state())


def test_compiled_sampling_gives_the_eager_tokens(aot_eager, monkeypatch):
    """Sampled rows (temperature, top-k, top-p; per-row and shared seeded generators; a greedy row among
    them): the compiled step and selection draw the eager path's tokens, speculative decoding's (compiled
    verification and drafting) too."""
    monkeypatch.setattr(compiled, "SELECT_MIN_VOCAB", 0)  # (tiny-v3's vocabulary selects eagerly)
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    mixed = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=1, stop_tokens=[]),
             SamplingParams(max_new_tokens=7, temperature=0.7, top_k=20, top_p=0.9, seed=2, stop_tokens=[]),
             SamplingParams(max_new_tokens=12, stop_tokens=[])]
    shared = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[])  # one generator, 3 rows
    for spec in (False, True):
        fast, eager = Engine(model, compile=True, speculative=spec), Engine(model, compile=False, speculative=spec)
        for params in (mixed, shared):
            assert _tokens(fast, PROMPTS, params) == _tokens(eager, PROMPTS, params), (spec, params)
    assert {k[1] for k in compiled._compiled[model]} == {"step", "select", "draft"}


def test_filters_read_from_the_parameters_are_the_tensors():
    V = 50
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    for ps in ([SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=7)],
               [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.8, top_k=100)],
               [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=2.0, top_k=9)]):
        ps = ps * 2
        args = (torch.tensor([p.temperature for p in ps]), torch.tensor([p.top_k for p in ps]),
                torch.tensor([p.top_p for p in ps]))
        assert torch.equal(distributions(logits, *args, Filters.of(ps, V)), distributions(logits, *args))
