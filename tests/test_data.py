"""Datasets: formats, registry, mixing, splits, truncation, caching, and every bad-input message."""

from __future__ import annotations

import json

import pytest

from conftest import DATA_DIR, TINY_MODEL, write_dataset
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.encode import IGNORE, Dropped, encode_chat
from tunesmith.data.errors import DataError
from tunesmith import stages
from tunesmith.data.pipeline import build_datasets, mix, split_eval
from tunesmith.data.templates import load_template


def cfg_for(tmp_path, dataset, **overrides):
    args = [f"model_name_or_path={TINY_MODEL}", f"dataset={dataset}", f"dataset_dir={tmp_path}",
            f"data_cache_dir={tmp_path / 'cache'}"] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(args)


def build(tmp_path, tokenizer, dataset, template="chatml", **overrides):
    cfg = cfg_for(tmp_path, dataset, template=template, **overrides)
    tmpl = None if cfg.finetuning.stage == "pt" else load_template(template, tokenizer)
    return build_datasets(cfg, tokenizer, tmpl, stages.get(cfg.finetuning.stage).rows, use_cache=False)


def decoded_labels(data, i, tokenizer):
    ids, labels = data.train[i]
    return tokenizer.decode([t for t in labels.tolist() if t != IGNORE])


# ----------------------------------------------------------------------------- formats
def test_alpaca_with_system_and_history(tmp_path, tokenizer):
    write_dataset(tmp_path, "a", [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.",
                                   "history": [["Hi", "Hello"]]}])
    data = build(tmp_path, tokenizer, "a")
    ids, _ = data.train[0]
    assert tokenizer.decode(ids.tolist()) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello<|im_end|>\n<|im_start|>user\nAdd\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n")
    assert decoded_labels(data, 0, tokenizer) == "Hello<|im_end|>5<|im_end|>"


def test_sharegpt_openai_and_custom_columns(tmp_path, tokenizer):
    write_dataset(tmp_path, "s", [{"conv": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}]}],
                  {"formatting": "sharegpt", "columns": {"messages": "conv"},
                   "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}})
    write_dataset(tmp_path, "o", [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}], {"formatting": "openai"},
                  suffix=".jsonl")
    data = build(tmp_path, tokenizer, "s,o")
    assert len(data.train) == 2
    assert tokenizer.decode(data.train[1][0].tolist()).startswith("<|im_start|>system\nS<|im_end|>")
    assert decoded_labels(data, 0, tokenizer) == "yo<|im_end|>"


def test_tool_calling_sharegpt(tmp_path, tokenizer):
    cfg = load_config([f"model_name_or_path={TINY_MODEL}", "dataset=glaive_toolcall_demo", f"dataset_dir={DATA_DIR}",
                       "template=chatml", "max_samples=5", "cutoff_len=1024"])
    data = build_datasets(cfg, tokenizer, load_template("chatml", tokenizer), "chat", use_cache=False)
    text = tokenizer.decode(data.train[0][0].tolist())
    assert '"name": "get_weather"' in text and "<tool_call>" in text and "<|im_start|>tool\n" in text


def test_text_for_pretraining_from_jsonl_and_txt(tmp_path, tokenizer):
    write_dataset(tmp_path, "t", [{"text": "The sky is blue."}], suffix=".jsonl")
    write_dataset(tmp_path, "raw", "Line one.\n\nLine two.\n", suffix=".txt")
    data = build(tmp_path, tokenizer, "t,raw", stage="pt")
    assert len(data.train) == 3
    ids, labels = data.train[0]
    assert tokenizer.decode(ids.tolist()) == "The sky is blue.<|endoftext|>"
    assert labels.tolist() == ids.tolist()


def test_csv_and_parquet(tmp_path, tokenizer):
    write_dataset(tmp_path, "c", "instruction,input,output\nSay hi,,hi\n", suffix=".csv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "Say yo", "output": "yo"}]), tmp_path / "p.parquet")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["p"] = {"file_name": "p.parquet"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    data = build(tmp_path, tokenizer, "c,p")
    assert [decoded_labels(data, i, tokenizer) for i in range(2)] == ["hi<|im_end|>", "yo<|im_end|>"]


def test_ranking_rows_become_chosen_and_rejected(tmp_path):
    from tunesmith.data.formats import to_conversation
    from tunesmith.data.readers import RawRow
    from tunesmith.data.registry import resolve

    spec = resolve("preference_demo", str(DATA_DIR))[0]
    conv = to_conversation(spec, RawRow("x", 1, {"instruction": "Q", "chosen": "good", "rejected": "bad"}), "pairs")
    assert conv.messages == [Message("user", "Q")]
    assert (conv.chosen.content, conv.rejected.content) == ("good", "bad")


# ----------------------------------------------------------------------------- registry, mixing, splits
def test_max_samples_val_size_and_seeded_split(tmp_path, tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    write_dataset(tmp_path, "a", rows)
    one = build(tmp_path, tokenizer, "a", max_samples=20, val_size=0.25)
    two = build(tmp_path, tokenizer, "a", max_samples=20, val_size=0.25)
    assert (len(one.train), len(one.eval)) == (15, 5)
    assert one.eval.input_ids.tolist() == two.eval.input_ids.tolist()
    counted = build(tmp_path, tokenizer, "a", val_size=7)
    assert (len(counted.train), len(counted.eval)) == (43, 7)


def test_mixing_strategies():
    a, b = list(range(10)), list(range(100, 103))
    assert mix([a, b], "concat", None, 0) == a + b
    under = mix([a, b], "interleave_under", None, 0)
    assert len(set(under) & set(b)) <= 3 and len(under) < len(a) + len(b)
    over = mix([a, b], "interleave_over", "0.5,0.5", 0)
    assert set(a) <= set(over) and set(b) <= set(over)
    assert mix([a, b], "interleave_over", "0.5,0.5", 0) == over


def test_split_eval_rejects_too_large():
    with pytest.raises(DataError, match="leaves no training data"):
        split_eval([1, 2], 2, 0)


def test_cache_is_reused_and_rebuilt(tmp_path, tokenizer):
    write_dataset(tmp_path, "a", [{"instruction": "q", "output": "a"}])
    cfg = cfg_for(tmp_path, "a", template="chatml")
    tmpl = load_template("chatml", tokenizer)
    first = build_datasets(cfg, tokenizer, tmpl, "chat")
    assert first.train_conversations is not None  # freshly built
    second = build_datasets(cfg, tokenizer, tmpl, "chat")
    assert second.train_conversations is None and second.cache_path == first.cache_path
    cfg.data.overwrite_cache = True
    assert build_datasets(cfg, tokenizer, tmpl, "chat").train_conversations is not None
    write_dataset(tmp_path, "a", [{"instruction": "q", "output": "changed"}])
    cfg.data.overwrite_cache = False
    assert build_datasets(cfg, tokenizer, tmpl, "chat").cache_path != first.cache_path
    # template settings are part of the key: the same data rendered without thinking is another cache
    nothink = load_template("chatml", tokenizer, enable_thinking=False)
    assert build_datasets(cfg, tokenizer, nothink, "chat").cache_path != build_datasets(cfg, tokenizer, tmpl, "chat").cache_path


# ----------------------------------------------------------------------------- truncation
def test_truncation_keeps_whole_turns_and_end_of_turn(tokenizer):
    template = load_template("chatml", tokenizer)
    conv = Conversation([Message("user", "a " * 20), Message("assistant", "b " * 20),
                         Message("user", "c " * 20), Message("assistant", "d " * 20)])
    [rendered] = template.render_chat(conv)
    full = encode_chat(rendered, tokenizer, 4096)
    first_turn_len = full.input_ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), 25) + 1
    cut = encode_chat(rendered, tokenizer, first_turn_len + 5)
    assert cut.truncated and cut.input_ids == full.input_ids[:first_turn_len]
    # The first turn alone is too long: contents shrink, headers and <|im_end|> stay.
    short = encode_chat(rendered, tokenizer, 30)
    text = tokenizer.decode(short.input_ids)
    assert len(short.input_ids) == 30
    assert text.startswith("<|im_start|>user\na") and "<|im_end|>\n<|im_start|>assistant\nb" in text
    assert text.endswith("<|im_end|>")
    # a cut answer keeps its end-of-turn token in the text but does not train it (no early stops learnt)
    assert short.labels[-1] == IGNORE and tokenizer.decode([t for t in short.labels if t != IGNORE]) == "b b b b b b b b b b"
    # an answer kept whole still trains its end token
    assert tokenizer.decode([t for t in cut.labels if t != IGNORE]).endswith("<|im_end|>")
    with pytest.raises(Dropped, match="longer than cutoff_len"):
        encode_chat(rendered, tokenizer, 30, truncation="drop")
    with pytest.raises(Dropped, match="template tokens alone"):
        encode_chat(rendered, tokenizer, 8)


def test_truncation_counts_are_reported(tmp_path, tokenizer):
    write_dataset(tmp_path, "a", [{"instruction": "x " * 100, "output": "y"}, {"instruction": "q", "output": "a"}])
    kept = build(tmp_path, tokenizer, "a", cutoff_len=40)
    assert kept.report.truncated == 1 and len(kept.train) == 2
    dropped = build(tmp_path, tokenizer, "a", cutoff_len=40, truncation="drop")
    assert dict(dropped.report.samples_dropped) == {"longer than cutoff_len": 1} and len(dropped.train) == 1


# ----------------------------------------------------------------------------- bad input
BAD_ROWS = [
    ("missing required column `output`", [{"instruction": "q"}], {}),
    ("roles do not alternate: message 1 is `user`",
     [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}], {"formatting": "sharegpt"}),
    ("empty response", [{"instruction": "q", "output": "  "}], {}),
    ("`tools` is not valid JSON", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                                    "tools": "[{oops"}], {"formatting": "sharegpt"}),
    ("function call is not valid JSON",
     [{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{name: f}"},
                         {"from": "observation", "value": "1"}, {"from": "gpt", "value": "b"}]}],
     {"formatting": "sharegpt"}),
    ("missing required column `question`", [{"instruction": "q", "output": "a"}], {"columns": {"prompt": "question"}}),
]


@pytest.mark.parametrize("message,rows,entry", BAD_ROWS)
def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer, message, rows, entry):
    path = write_dataset(tmp_path, "bad", [{"instruction": "fine", "output": "ok"}] + rows
                         if not entry else rows, entry)
    with pytest.raises(DataError) as err:
        build(tmp_path, tokenizer, "bad")
    text = str(err.value)
    assert message in text and str(path) in text and "row" in text
    assert "on_bad_row: skip" in text


def test_malformed_json_line_and_skip_mode(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": oops}\n{"instruction": "r", "output": "b"}\n')
    (tmp_path / "dataset_info.json").write_text(json.dumps({"bad": {"file_name": "bad.jsonl"}}))
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: malformed JSON line"):
        build(tmp_path, tokenizer, "bad")
    data = build(tmp_path, tokenizer, "bad", on_bad_row="skip")
    assert len(data.train) == 2 and dict(data.report.rows_bad) == {"malformed JSON": 1}


def test_registry_errors(tmp_path, tokenizer):
    write_dataset(tmp_path, "a", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"(?s)unknown dataset `nope`.*use one of: a"):
        build(tmp_path, tokenizer, "nope")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["gone"] = {"file_name": "missing.json"}
    info["cols"] = {"file_name": "a.json", "columns": {"promt": "instruction"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="points at a path that does not exist"):
        build(tmp_path, tokenizer, "gone")
    with pytest.raises(DataError, match=r"unknown column key\(s\) \['promt'\]"):
        build(tmp_path, tokenizer, "cols")
    with pytest.raises(DataError, match="dataset_dir `.*nowhere` does not exist"):
        build(tmp_path, tokenizer, "a", dataset_dir=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the command
def test_data_command_summary_and_dump(tmp_path, capsys):
    dump_path = tmp_path / "dump.jsonl"
    code = main(["data", f"model_name_or_path={TINY_MODEL}", "dataset=alpaca_en_demo,sharegpt_multiturn_demo",
                 f"dataset_dir={DATA_DIR}", "max_samples=40", "val_size=0.1", f"data_cache_dir={tmp_path}",
                 "--dump", str(dump_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "rows read:     80" in out and "samples kept:  train=72, eval=8" in out
    assert "«" in out and "supervised:" in out
    lines = [json.loads(line) for line in dump_path.read_text().splitlines()]
    assert len(lines) == 80 and set(lines[0]) == {"split", "index", "input_ids", "labels", "text"}


def test_data_command_bad_input_exits_2(tmp_path, capsys):
    write_dataset(tmp_path, "bad", [{"instruction": "q"}])
    code = main(["data", f"model_name_or_path={TINY_MODEL}", "dataset=bad", f"dataset_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "missing required column `output`" in err and "Traceback" not in err


def test_hub_dataset_goes_through_datasets_load_dataset(tmp_path, tokenizer, monkeypatch):
    import datasets

    calls = {}

    def fake_load_dataset(path, name=None, split=None):
        calls.update(path=path, name=name, split=split)
        return [{"instruction": "q", "output": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"hub": {"hf_hub_url": "someone/some-set", "subset": "en", "split": "validation"}}))
    data = build(tmp_path, tokenizer, "hub")
    assert calls == {"path": "someone/some-set", "name": "en", "split": "validation"}
    assert decoded_labels(data, 0, tokenizer) == "a<|im_end|>"

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load hub dataset `someone/some-set`"):
        build(tmp_path, tokenizer, "hub", overwrite_cache="true")


def test_data_command_on_preference_pairs(tmp_path, capsys):
    assert main(["data", f"model_name_or_path={TINY_MODEL}", "dataset=preference_demo", f"dataset_dir={DATA_DIR}",
                 "stage=rm", "max_samples=10", f"data_cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "train_chosen=10, train_rejected=10" in out
