"""Batched generation over the KV cache: exact greedy parity with transformers, sampling controls."""
import warnings

import pytest
import torch

import nanoseek
from nanoseek.interop.hf import load_pretrained
from conftest import TINY_V2_HF, TINY_V3_HF

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind,cfg,compile", [("v3", TINY_V3_HF, False), ("v2", TINY_V2_HF, False),
                                              ("v3", TINY_V3_HF, True)])  # (compiled decoding: Inductor, once)
def test_greedy_matches_transformers_generate(tmp_path, seed, kind, cfg, compile):
    Config, Model = {"v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
                     "v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}[kind]
    hf = Model(Config(**cfg, attn_implementation="eager", pad_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = load_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]  # different lengths
    L = max(map(len, prompts))
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, L:].tolist()
    assert nanoseek.generate(ns, prompts, max_new_tokens=24, stop_tokens=[], compile=compile) == ref


def test_a_saved_model_directory_works_in_transformers_as_in_nanoseek(capsys):
    """Issue 17.4: AutoTokenizer + AutoModelForCausalLM + generate() on a directory nanoseek wrote give
    nanoseek's ids (BOS included) and `nanoseek generate`'s greedy reply; the files say dtype and sampling."""
    from nanoseek.cli import main as cli_main

    path = infer_fixtures.chat_model_dir()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert hf.dtype == torch.float32 and hf.generation_config.temperature == 0.6  # from the files written
    prompt = nanoseek.load_tokenizer(path).render_chat([{"role": "user", "content": "hello"}])
    prompt = prompt.removeprefix(hf_tok.bos_token)  # the tokenizer adds it
    enc = hf_tok(prompt, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == nanoseek.load_tokenizer(path).encode(prompt, add_bos=True)
    out = hf.generate(**enc, do_sample=False, max_new_tokens=30)[0, enc["input_ids"].shape[1]:]
    reply = hf_tok.decode(out, skip_special_tokens=True)
    assert reply == infer_fixtures.REPLY  # the think tags survive skip_special_tokens
    cli_main(["generate", "--model", path, "--prompt", prompt, "--max-new-tokens", "30"])
    assert capsys.readouterr().out.strip() == reply.strip()


def test_sampling_controls(seed):
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    prompts = [[3, 4, 5], [6, 7]]
    greedy = nanoseek.generate(model, prompts, max_new_tokens=12, stop_tokens=[])
    # top-k 1 and a vanishing top-p are greedy at any temperature
    assert nanoseek.generate(model, prompts, max_new_tokens=12, temperature=1.0, top_k=1, stop_tokens=[]) == greedy
    assert nanoseek.generate(model, prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, stop_tokens=[]) == greedy
    a = nanoseek.generate(model, prompts, max_new_tokens=12, temperature=2.0, seed=7, stop_tokens=[])
    b = nanoseek.generate(model, prompts, max_new_tokens=12, temperature=2.0, seed=7, stop_tokens=[])
    c = nanoseek.generate(model, prompts, max_new_tokens=12, temperature=2.0, seed=8, stop_tokens=[])
    assert a == b and a != c and a != greedy
    # a stop token ends its row and is kept
    stop = greedy[0][3]
    out = nanoseek.generate(model, prompts, max_new_tokens=12, stop_tokens=[stop])
    assert out[0] == greedy[0][: greedy[0].index(stop) + 1]


def test_generate_rejects_bad_input(seed):
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    with pytest.raises(ValueError, match="at least one token"):
        nanoseek.generate(model, [[1], []])
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        nanoseek.generate(model, [[1, 999]])
    with pytest.raises(ValueError, match="top_p"):
        nanoseek.generate(model, [[1]], temperature=1.0, top_p=0.0)


# ---------------------------------------------------------------------------- the engine
import itertools  # noqa: E402
import math  # noqa: E402

import infer_fixtures  # noqa: E402
from nanoseek.infer import compiled  # noqa: E402
from nanoseek.infer.engine import Batch, Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams, apply_repetition_penalty, distributions  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30], [40, 41, 42, 43, 44]]


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compile(request, monkeypatch):
    """Decode eagerly, or as compiled graphs traced by aot_eager (the graphs Inductor would get: static
    shapes, no breaks, the same numbers; Inductor's own codegen is tested once, against transformers)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    return request.param


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()


def _reference_greedy(model, prompt, n, penalty=1.0):
    """Full forward over the whole sequence at every step: no cache, no batching."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[:, -1]
            seq.append(int(apply_repetition_penalty(logits, torch.tensor([seq]), penalty).argmax()))
    return seq[len(prompt):]


def test_batched_rows_equal_unbatched_reference(tiny):
    out = nanoseek.generate(tiny, PROMPTS, max_new_tokens=12, stop_tokens=[])
    assert out == [_reference_greedy(tiny, p, 12) for p in PROMPTS]
    pen = nanoseek.generate(tiny, PROMPTS[:2], max_new_tokens=12, stop_tokens=[], repetition_penalty=1.5)
    assert pen == [_reference_greedy(tiny, p, 12, 1.5) for p in PROMPTS[:2]]


def test_rows_with_one_prompt_share_its_prefill(tiny):
    """A GRPO group (one prompt, G samples) prefills the prompt once; each row decodes as if alone."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    for speculative in (False, True):
        engine = Engine(tiny, speculative=speculative)
        out = [c.tokens for c in engine.generate(prompts, max_new_tokens=8, stop_tokens=[])]
        assert out == [_reference_greedy(tiny, p, 8) for p in prompts]
        assert engine.stats.prefill_tokens == len(PROMPTS[0]) + len(PROMPTS[1]) - 2
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s, stop_tokens=[]) for s in (1, 2, 1, 3)]
    a, _, c, d = (c.tokens for c in Engine(tiny).generate(prompts, params))
    assert a == c == Engine(tiny).generate([PROMPTS[0]], params[0])[0].tokens and a != d  # (rows own their seeds)


def test_stream_yields_per_step_deltas_that_add_up(tiny):
    engine = Engine(tiny)
    steps = list(engine.stream(PROMPTS, max_new_tokens=6, stop_tokens=[]))
    assert len(steps) == 6 and all(len(s) == len(PROMPTS) and all(len(d.tokens) == 1 for d in s) for s in steps)
    assert [d.finish_reason for d in steps[-1]] == ["length"] * len(PROMPTS)
    joined = [[t for s in steps for d in s if d.key == i for t in d.tokens] for i in range(len(PROMPTS))]
    assert joined == nanoseek.generate(tiny, PROMPTS, max_new_tokens=6, stop_tokens=[])
    assert engine.stats.tokens == 6 * len(PROMPTS) and engine.stats.tokens_per_forward == 1.0


def test_logprobs_are_the_models(tiny):
    prompt = [3, 4, 5, 6]
    for temperature in (0.0, 0.7):
        c = Engine(tiny).generate([prompt], max_new_tokens=5, temperature=temperature, seed=0, logprobs=True,
                                  stop_tokens=[])[0]
        with torch.no_grad():
            logits = tiny(torch.tensor([prompt + c.tokens])).logits[0, len(prompt) - 1:-1]
        ref = (logits / (temperature or 1.0)).log_softmax(-1).gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)


@pytest.mark.parametrize("speculative", [False, True])
def test_top_logprobs_logit_bias_and_prompt_scores(speculative):
    """Against full forwards of the whole sequence; the speculative path on a model whose drafts are
    accepted, so both of its tokens per step are checked."""
    model, cycle, _ = infer_fixtures.pattern_model()
    prompts = [cycle[i:i + 3].tolist() for i in (0, 10)]
    engine = Engine(model, speculative=speculative)
    out = engine.generate(prompts, max_new_tokens=8, stop_tokens=[], logprobs=True, top_logprobs=3)
    for prompt, c in zip(prompts, out):
        seq = prompt + c.tokens
        with torch.no_grad():
            logp = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
        values, ids = logp[len(prompt) - 1:-1].topk(3)
        assert [[t for t, _ in top] for top in c.top_logprobs] == ids.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in top] for top in c.top_logprobs]), values, atol=1e-4)
        scores, tops = engine.score(seq, top=2)
        assert scores[0] is None and tops[0] is None
        assert torch.allclose(torch.tensor(scores[1:]), logp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0],
                              atol=1e-4)
        assert [[t for t, _ in top] for top in tops[1:]] == logp[:-1].topk(2).indices.tolist()
    if speculative:
        assert engine.stats.accepted > 0
    # logit_bias: ban each row's greedy continuation's first token and favour another one
    banned, favoured = out[0].tokens[0], 7
    bias = {banned: -100.0, favoured: 3.0}
    got = engine.generate(prompts, max_new_tokens=6, stop_tokens=[], logit_bias=bias)
    for prompt, c in zip(prompts, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                logits = model(torch.tensor([seq])).logits[0, -1]
                logits[banned] -= 100
                logits[favoured] += 3
                seq.append(int(logits.argmax()))
        assert c.tokens == seq[len(prompt):] and banned not in c.tokens
    with pytest.raises(ValueError, match="logit_bias"):
        engine.generate(prompts, logit_bias={10**9: 1.0})
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.generate(prompts, top_logprobs=2)


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-dense"])  # latent cache; K/V cache (GQA)
def test_continuous_batching_join_and_leave(tiny, preset, compile):
    """Rows joining a running batch, and rows removed from it, leave every other row's tokens unchanged."""
    model = tiny if preset == "tiny-v3" else nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset(preset)).eval()
    solo = [nanoseek.generate(model, [p], max_new_tokens=16, stop_tokens=[], compile=False)[0] for p in PROMPTS]
    for speculative in (False, True) if model.config.num_nextn_predict_layers else (False,):
        batch = Batch(model, speculative=speculative, compile=compile)
        params = SamplingParams(max_new_tokens=16, stop_tokens=[])
        got = {i: [] for i in range(len(PROMPTS))}
        batch.add(PROMPTS[:2], params, keys=[0, 1])
        for _ in range(3):
            for d in batch.step():
                got[d.key] += d.tokens
        batch.add(PROMPTS[2:], params, keys=[2, 3])  # shorter and longer than the running rows
        assert batch.keys == [0, 1, 2, 3]
        for d in batch.step():
            got[d.key] += d.tokens
        assert batch.remove(1) and not batch.remove(1)
        while batch:
            for d in batch.step():
                got[d.key] += d.tokens
        assert got[1] == solo[1][:len(got[1])] and len(got[1]) < 16
        for i in (0, 2, 3):
            assert got[i] == solo[i], (speculative, i)
        assert batch.cache is None and len(batch) == 0


def test_speculative_greedy_is_identical(tiny, compile):
    engine = Engine(tiny, speculative=True, compile=compile)
    spec = [c.tokens for c in engine.generate(PROMPTS, max_new_tokens=24, stop_tokens=[])]
    assert spec == nanoseek.generate(tiny, PROMPTS, max_new_tokens=24, stop_tokens=[], compile=False)
    assert engine.stats.drafted > 0 and 0 <= engine.stats.acceptance_rate <= 1
    assert nanoseek.generate(tiny, PROMPTS, max_new_tokens=24, stop_tokens=[], speculative=True) == spec
    with pytest.raises(ValueError, match="MTP"):
        Engine(nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v2")), speculative=True).generate([[1]])


def test_trained_mtp_drafts_are_accepted():
    """A model whose MTP learned the data: ~all drafts accepted, ~2 tokens per forward, same tokens."""
    model, cycle, succ = infer_fixtures.pattern_model()
    prompts = [cycle[i:i + 3].tolist() for i in (0, 10, 20, 30)]
    engine = Engine(model, speculative=True)
    out = [c.tokens for c in engine.generate(prompts, max_new_tokens=40, stop_tokens=[])]
    assert out == nanoseek.generate(model, prompts, max_new_tokens=40, stop_tokens=[])
    assert all(succ[a] == b for row, p in zip(out, prompts) for a, b in zip([p[-1]] + row, row))
    assert engine.stats.acceptance_rate > 0.9 and engine.stats.tokens_per_forward > 1.85, engine.stats


def _chi_square_z(samples, exact, V, n):
    """Chi-square statistic of the joint counts against `exact` (cells < 5 expected pooled), as a
    Wilson-Hilferty z-score: ~N(0, 1) when the sampler is right."""
    idx = (samples * torch.tensor([V ** (n - 1 - i) for i in range(n)])).sum(1)
    counts = torch.bincount(idx, minlength=V ** n).double()
    expected = exact.double() * counts.sum()
    big = expected >= 5
    o = torch.cat([counts[big], counts[~big].sum()[None]])
    e = torch.cat([expected[big], expected[~big].sum()[None]])
    stat, k = float(((o - e) ** 2 / e).sum()), len(o) - 1
    return ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 5)])
def test_speculative_sampling_preserves_the_distribution(temperature, top_k):
    """Joint law of 3 sampled tokens over an 8-token vocabulary: speculative (random MTP, so drafts are
    both accepted and rejected) and plain sampling both match the exact law from full forwards."""
    torch.manual_seed(0)
    V, n, N = 8, 3, 5000
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset(
        "tiny-v3", vocab_size=V, initializer_range=0.3, eos_token_id=None)).eval()
    prompt = [1, 2, 3, 4]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)).logits[:, 3:-1]
    B = logits.shape[0] * n
    probs = distributions(logits.reshape(B, V), torch.full((B,), temperature), torch.full((B,), top_k),
                          torch.ones(B)).view(-1, n, V)
    exact = probs.gather(2, seqs[:, :, None])[..., 0].prod(1)
    for speculative in (False, True):
        engine = Engine(model, speculative=speculative)
        out = engine.generate([prompt] * N, max_new_tokens=n, temperature=temperature, top_k=top_k, seed=1,
                              stop_tokens=[])
        z = _chi_square_z(torch.tensor([c.tokens for c in out]), exact, V, n)
        assert z < 4, (speculative, z)
        if speculative:
            assert 0.1 < engine.stats.acceptance_rate < 0.95  # both branches of the rule ran


def test_per_row_sampling_parameters(tiny):
    """One batch, different settings per row: each row behaves as if it ran alone."""
    greedy = nanoseek.generate(tiny, PROMPTS[:2], max_new_tokens=8, stop_tokens=[])
    params = [SamplingParams(max_new_tokens=8, stop_tokens=[]),
              SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, stop_tokens=[])]
    assert [c.tokens for c in Engine(tiny).generate(PROMPTS[:2], params)] == greedy
    params = [SamplingParams(max_new_tokens=8, temperature=1.5, seed=5, stop_tokens=[]),
              SamplingParams(max_new_tokens=3, stop_tokens=[])]
    a, b = Engine(tiny).generate(PROMPTS[:2], params)
    assert b.tokens == greedy[1][:3] and b.finish_reason == "length"
    assert a.tokens == Engine(tiny).generate([PROMPTS[0]], params[0])[0].tokens  # its own seeded generator


def test_stop_strings_with_a_tokenizer():
    tok = nanoseek.load_tokenizer(infer_fixtures.chat_model_dir())
    model = load_pretrained(infer_fixtures.chat_model_dir())
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    full = Engine(model, tok).generate([ids], max_new_tokens=40)[0]
    assert full.text == infer_fixtures.REPLY and full.finish_reason == "stop" and full.tokens[-1] == tok.eos_id
    cut = Engine(model, tok).generate([ids], max_new_tokens=40, stop_strings=["plus t"])[0]
    assert cut.text == "<think>\nTwo " and cut.finish_reason == "stop"
    assert "plus t" in tok.decode(cut.tokens) and "plus t" not in tok.decode(cut.tokens[:-1])
    assert nanoseek.generate(model, [ids], max_new_tokens=40, stop_strings=["plus t"], tokenizer=tok) == [cut.tokens]
    with pytest.raises(ValueError, match="tokenizer"):
        nanoseek.generate(model, [ids], stop_strings=["x"])
