"""lm-evaluation-harness on a nanoseek model (issue 17 acceptance; slow, needs the optional `eval` extra):
a multiple-choice (loglikelihood) task and a generate-until task score the same through `local-completions`
against `nanoseek serve` as through `--model hf` on the same directory, as README's "Evaluating with
lm-evaluation-harness" runs them."""
import json

import pytest

from infer_fixtures import QUESTIONS, REPLY, chat_model_dir, serve_process

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("httpx")

import nanoseek  # noqa: E402

WRONG = ["It is 5.", "<think>\nNo idea.\n</think>\n\nMaybe 3.", "Four."]


def _write_tasks(directory, tok) -> None:
    """Two local tasks over jsonl files: chat prompts the fixture model answers with REPLY."""
    bos = tok.decode([tok.bos_id])
    prompts = [tok.render_chat([{"role": "user", "content": q}]).removeprefix(bos) for q in QUESTIONS]
    rows = [{"prompt": p, "choices": [WRONG[i % 3], REPLY, WRONG[(i + 1) % 3]], "label": 1, "answer": REPLY}
            for i, p in enumerate(prompts)]
    data = directory / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"{{prompt}}\"\n")
    (directory / "mc.yaml").write_text(
        "task: nanoseek_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "gen.yaml").write_text(
        "task: nanoseek_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"Question:\"]\n  max_gen_toks: 40\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def _evaluate(model: str, model_args: str, tasks_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["nanoseek_mc", "nanoseek_gen"],
                          task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True, batch_size=1)
    scores = {f"{task}/{k}": v for task, metrics in out["results"].items() for k, v in metrics.items()
              if isinstance(v, float) and "stderr" not in k}
    loglikelihoods = [r[0] for s in out["samples"]["nanoseek_mc"] for r in s["filtered_resps"]]
    return {"scores": scores, "loglikelihoods": loglikelihoods,
            "generations": [s["filtered_resps"][0] for s in out["samples"]["nanoseek_gen"]]}


def test_lm_eval_scores_the_same_through_the_server_as_on_the_directory(tmp_path):
    path = chat_model_dir()
    _write_tasks(tmp_path, nanoseek.load_tokenizer(path))
    local = _evaluate("hf", f"pretrained={path},dtype=float32,device=cpu", tmp_path)

    with serve_process() as (url, _):
        served = _evaluate("local-completions", f"model=tiny,base_url={url}/v1/completions,"
                           f"tokenizer_backend=huggingface,tokenizer={path},add_bos_token=True,max_retries=1", tmp_path)
    assert local["scores"]["nanoseek_mc/acc,none"] == 1.0  # the fixture model prefers the reply it was taught
    assert local["scores"]["nanoseek_gen/exact_match,none"] == 1.0
    assert served["scores"] == local["scores"]
    assert served["generations"] == local["generations"]
    assert served["loglikelihoods"] == pytest.approx(local["loglikelihoods"], abs=1e-3)
