"""The one data-file reader: .jsonl(.gz), .json, .parquet and `datasets` save_to_disk folders, for every command
that takes a data file, with a nameable text column and one-line errors naming the file."""
import gzip
import json

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq

from nanoseek.cli import main
from nanoseek.data import iter_documents
from nanoseek.data.files import read_rows
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.sft import load_sft_data
from nanoseek.tasks import make_task

ROWS = [{"prompt": "1+1=", "completion": "2", "content": "ünïcode text one"},
        {"prompt": "2+2=", "completion": "4", "content": "second document"}]


def _save_to_disk(folder, rows):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files named in state.json."""
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_fingerprint": "x", "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


@pytest.fixture
def files(tmp_path):
    out = {"jsonl": tmp_path / "d.jsonl", "gz": tmp_path / "d.jsonl.gz", "json": tmp_path / "d.json",
           "parquet": tmp_path / "d.parquet", "saved": tmp_path / "saved"}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    out["jsonl"].write_text(text, encoding="utf-8")
    with gzip.open(out["gz"], "wt", encoding="utf-8") as f:
        f.write(text)
    out["json"].write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"])
    _save_to_disk(out["saved"], ROWS)
    return out


@pytest.mark.parametrize("kind", ["jsonl", "gz", "json", "parquet", "saved"])
def test_every_data_command_reads_every_kind_alike(files, kind):
    path = str(files[kind])
    assert read_rows(path) == ROWS
    # sft --data (read as UTF-8 text before: a parquet file failed with a UnicodeDecodeError traceback)
    cfg = PostConfig.load(None, [f"data.train={json.dumps(path)}"])
    assert load_sft_data(cfg, None) == ROWS
    # corpora (tokenizer train, data prepare, pretraining sources) with a named text column
    assert list(iter_documents(path, text_column="content")) == [r["content"] for r in ROWS]
    # data-file tasks
    task = make_task("file", path=path, format="qa", fields={"question": "prompt", "answer": "completion"})
    assert task is not None


def test_tokenizer_train_and_data_prepare_take_a_text_column(files, tmp_path):
    main(["tokenizer", "train", "--input", str(files["saved"]), "--text-column", "content", "--vocab-size", "270",
          "--out", str(tmp_path / "tok")])
    main(["data", "prepare", "--input", str(files["parquet"]), "--text-column", "content", "--tokenizer",
          str(tmp_path / "tok"), "--out", str(tmp_path / "ds"), "--val-fraction", "0.5"])
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 2


def test_a_saved_dataset_inside_a_corpus_directory_is_one_source(files, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain text")
    _save_to_disk(corpus / "ds", [{"text": "from arrow"}])
    assert sorted(iter_documents(corpus)) == ["from arrow", "plain text"]


def test_bad_data_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8"):
        read_rows(bad)
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"x.bin: unsupported data file; expected .jsonl, .jsonl.gz, .json"):
        read_rows(tmp_path / "x.bin")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="obj.json: expected a JSON list of objects"):
        read_rows(tmp_path / "obj.json")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet: not a parquet file"):
        read_rows(tmp_path / "fake.parquet")
    splits = tmp_path / "dd"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ValueError, match="DatasetDict: name one split's folder, e.g. .*dd/train"):
        read_rows(splits)
    (tmp_path / "t.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: expected a 'content' string or a 'messages' list"):
        list(iter_documents(tmp_path / "t.jsonl", text_column="content"))
    with pytest.raises(SystemExit) as e:
        main(["sft", "--data", str(tmp_path / "fake.parquet"), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fake.parquet: not a parquet file" in err


def test_post_training_data_names_its_columns(files, tmp_path):
    """data.fields maps the rows' fields (prompt, completion, messages, chosen, rejected) to the file's columns."""
    qa = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": r["prompt"], "answer": r["completion"]} for r in ROWS]), qa)
    cfg = PostConfig.load(None, [f"data.train={json.dumps(str(qa))}",
                                 'data.fields={prompt = "question", completion = "answer"}'])
    assert load_sft_data(cfg, None) == [{"prompt": r["prompt"], "completion": r["completion"]} for r in ROWS]
    cfg = PostConfig.load(None, [f"data.train={json.dumps(str(qa))}", 'data.fields={prompt = "q"}'])
    with pytest.raises(ValueError, match=r"qa.parquet row 0: no column 'q' \(data.fields.prompt\); it has answer, "
                                         r"question"):
        load_sft_data(cfg, None)
    with pytest.raises(ValueError, match=r"data.fields.answer is invalid: allowed: messages, prompt, completion, "
                                         r"chosen, rejected"):
        PostConfig.load(None, ['data.fields={answer = "a"}'])
