"""JSONL datasets: every malformed input fails with ``file:line: what is wrong``; valid ones stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.data import DataError, Example, PromptDataset, iter_examples, load_examples, read_jsonl, write_jsonl


def write(tmp_path: Path, content: bytes | str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


GOOD = json.dumps({"prompt": "1+1?", "answer": "2"})


@pytest.mark.parametrize("content,line,fragment", [
    (GOOD + "\n{\"prompt\": \"2+2?\", \"answer\": \"4\"\n", 2, "invalid JSON"),
    (GOOD + "\n\n" + "{'prompt': 'single quotes'}\n", 3, "invalid JSON"),
    ("[" + GOOD + ",\n" + GOOD + "]\n", 1, "looks like one JSON array"),
    (GOOD + "\n[1, 2]\n", 2, "expected a JSON object"),
    (GOOD + "\n\"just a string\"\n", 2, "expected a JSON object"),
    ("", 1, "no records"),
    ("\n   \n\n", 3, "no records"),
    (GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "answer": "1"}\n', 2, "not valid UTF-8 (byte 0xe9 at column 16)"),
    (b"\xff\xfe" + GOOD.encode("utf-16-le"), 1, "not valid UTF-8"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, line, fragment):
    path = write(tmp_path, content)
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert fragment in str(info.value)
    assert info.value.line == line and info.value.path == str(path)


@pytest.mark.parametrize("record,fragment", [
    ({"answer": "2"}, "missing field 'prompt' (or 'messages')"),
    ({"prompt": "1+1?"}, "missing field 'answer'"),
    ({"prompt": "", "answer": "2"}, "'prompt' must be a non-empty string"),
    ({"prompt": 5, "answer": "2"}, "'prompt' must be a non-empty string"),
    ({"prompt": "q", "answer": ["2"]}, "'answer' must be a string or a number"),
    ({"prompt": "write add", "data_source": "code"}, "missing field 'tests'"),
    ({"prompt": "write add", "data_source": "code", "tests": [{"input": "1"}]}, "tests[0] must have"),
    ({"prompt": "write add", "data_source": "code", "tests": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}], "answer": "1"}, "messages[0]"),
    ({"messages": "hi", "answer": "1"}, "'messages' must be a non-empty list"),
    ({"prompt": "make 24", "answer": "24", "data_source": "countdown"}, "'numbers'"),
    ({"prompt": "q", "answer": "1", "data_source": 7}, "'data_source' must be a non-empty string"),
])
def test_missing_and_mistyped_fields_name_file_and_line(tmp_path, record, fragment):
    path = write(tmp_path, GOOD + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert fragment in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        list(read_jsonl(tmp_path))


def test_valid_records_stream_with_fields_and_meta(tmp_path):
    records = [
        {"prompt": "1+1?", "answer": 2, "id": 7, "difficulty": "easy"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
         "answer": "4"},
        {"prompt": "add", "data_source": "code", "tests": [{"input": "1 2", "output": "3"}, {"assert": "pass"}]},
        {"prompt": "make 24", "answer": "24", "data_source": "countdown", "numbers": [3, 8]},
    ]
    path = write(tmp_path, "\ufeff" + "\n".join(json.dumps(r) for r in records) + "\n\n")
    examples = load_examples(path)
    assert [e.data_source for e in examples] == ["math", "math", "code", "countdown"]
    assert examples[0].answer == "2" and examples[0].id == "7" and examples[0].meta == {"difficulty": "easy"}
    assert examples[0].where == f"{path}:1"
    assert examples[1].chat()[-1] == {"role": "user", "content": "2+2?"}
    assert examples[2].tests[1] == {"assert": "pass"} and examples[3].meta["numbers"] == [3, 8]
    assert [e.prompt for e in iter_examples(path, start=2)] == ["add", "make 24"]
    # round trip through write_jsonl
    out = tmp_path / "copy.jsonl"
    assert write_jsonl(out, (e.to_record() for e in examples)) == 4
    again = load_examples(out)
    assert [(e.prompt, e.messages, e.answer, e.tests, e.data_source, e.meta) for e in again] == \
        [(e.prompt, e.messages, e.answer, e.tests, e.data_source, e.meta) for e in examples]


def test_sft_records_need_no_reference(tmp_path):
    path = write(tmp_path, json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}) + "\n")
    assert load_examples(path, need_reference=False)[0].chat()[-1]["role"] == "assistant"


def test_prompt_dataset_order_depends_only_on_position():
    examples = [Example(prompt=str(i), answer=str(i)) for i in range(10)]
    a, b = PromptDataset(examples, seed=3), PromptDataset(examples, seed=3)
    first_epoch = [a.at(i).prompt for i in range(10)]
    assert sorted(first_epoch) == [str(i) for i in range(10)] and first_epoch != [str(i) for i in range(10)]
    assert [b.at(i).prompt for i in range(10, 20)] != first_epoch  # a new permutation per epoch
    # resuming at position 13 (any data-parallel size) continues the same stream
    assert [e.prompt for e in a.batch(13, 5)] == [b.at(i).prompt for i in range(13, 18)]
    assert [PromptDataset(examples, shuffle=False).at(i).prompt for i in range(12)][10:] == ["0", "1"]
