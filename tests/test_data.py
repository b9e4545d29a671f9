import json
from collections import Counter

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from florist.data import (
    COLUMNS,
    DataError,
    build_prompt,
    client_files,
    heterogeneity,
    instructions,
    is_client_folder,
    load_client,
    load_client_folder,
    load_clients,
    load_instructions,
    normalize_row,
    partition,
    partition_of,
    summary_table,
    tokenize_dataset,
)
from florist.jobs import LOSS_IGNORED
from florist.models import load_tokenizer

ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well. 2. Sleep. 3. Move."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "text": "ignored"},
]
WIZARD_ROWS = [{"instruction": "Explain recursion.", "output": "A function that calls itself."}]
SHAREGPT_ROWS = [
    {
        "idx": "x1",
        "conversations": [
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "And 3+3?"},
            {"from": "gpt", "value": "6"},
        ],
    }
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def small_dataset(categories: dict[str, int]) -> datasets.Dataset:
    rows = [
        {"instruction": f"{c} {i}", "input": "", "output": "o", "category": c}
        for c, n in categories.items()
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


# --- loading ---------------------------------------------------------------------------------------------------------


def test_dolly_client_folder(shared_data):
    folder = shared_data / "dolly"
    assert is_client_folder(folder)
    assert [f.name for f in client_files(folder)] == [f"client_{k}.json" for k in range(8)]  # test.json is not a client
    clients = load_client_folder(folder)
    assert len(clients) == 8
    assert sum(len(c) for c in clients) == 14935
    for c in clients:
        assert tuple(c.column_names) == COLUMNS
        assert all(c["category"]) and all(c["output"])
    raw = json.loads((folder / "client_0.json").read_text())[0]
    first = clients[0][0]
    assert (first["instruction"], first["input"], first["output"], first["category"]) == (
        raw["instruction"],
        raw["context"],
        raw["response"],
        raw["category"],
    )


def test_dolly_folder_as_one_dataset(shared_data):
    ds = load_instructions(str(shared_data / "dolly"))
    assert len(ds) == 14935
    assert len(set(ds["category"])) == 8


def test_alpaca_json_and_jsonl(tmp_path):
    as_json = load_instructions(str(write_json(tmp_path / "alpaca.json", ALPACA_ROWS)))
    jsonl = tmp_path / "alpaca.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ALPACA_ROWS) + "\n\n")
    as_jsonl = load_instructions(str(jsonl))
    for ds in (as_json, as_jsonl):
        assert tuple(ds.column_names) == COLUMNS
        assert ds[1] == {
            "instruction": "Translate to French.",
            "input": "Good morning",
            "output": "Bonjour",
            "category": "",
        }


def test_wizard_shapes(tmp_path):
    flat = load_instructions(str(write_json(tmp_path / "wizard.json", WIZARD_ROWS)))
    assert flat[0] == {
        "instruction": "Explain recursion.",
        "input": "",
        "output": "A function that calls itself.",
        "category": "",
    }
    chat = load_instructions(str(write_json(tmp_path / "wizard_v2.json", SHAREGPT_ROWS)))
    assert chat[0] == {"instruction": "What is 2+2?", "input": "", "output": "4", "category": ""}  # first exchange only


def test_mmlu_shaped_rows_keep_their_subject(shared_data):
    ds = load_instructions(str(shared_data / "mmlu" / "mmlu_1444.json"))
    assert len(ds) == 1444
    assert len(set(ds["category"])) == 57


def test_local_training_layout_and_gaps(tmp_path):
    for k in range(3):
        write_json(tmp_path / f"local_training_{k}.json", ALPACA_ROWS[: k + 1] if k < 2 else WIZARD_ROWS)
    write_json(tmp_path / "global_test.json", ALPACA_ROWS)
    assert [len(c) for c in load_client_folder(tmp_path)] == [1, 2, 1]
    (tmp_path / "local_training_1.json").unlink()
    with pytest.raises(DataError, match="local_training_1.json is missing"):
        load_client_folder(tmp_path)
    write_json(tmp_path / "local_training_1.json", ALPACA_ROWS)
    write_json(tmp_path / "client_0.json", ALPACA_ROWS)
    with pytest.raises(DataError, match="mixes client_K.json and local_training_K.json"):
        load_client_folder(tmp_path)


def test_folder_without_clients_is_not_a_client_folder(tmp_path):
    write_json(tmp_path / "train.json", ALPACA_ROWS)
    assert not is_client_folder(tmp_path)
    assert not is_client_folder(tmp_path / "train.json")
    with pytest.raises(DataError, match="no client_K.json"):
        load_client_folder(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"question": "q", "answer": "a"}]', r"bad.json: row 0: none of the known columns .*it has answer, question"),
        ("[1, 2]", r"bad.json: row 0: expected an object, found int"),
        ('{"instruction": "i", "output": ', r"bad.json: not valid JSON"),
        ('{"instruction": "i", "output": "o"}\n{"oops"', r"bad.json:2: not valid JSON"),
        ('"just a string"', r"bad.json: expected a JSON array of rows"),
        ("[]", r"bad.json: no rows"),
        ('[{"instruction": "i", "output": ["a", "b"]}]', r"bad.json: row 0: 'output' is a list, expected text"),
        ('[{"conversations": [{"from": "gpt", "value": "hi"}]}]', r"bad.json: row 0: 'conversations' has no user turn"),
    ],
)
def test_bad_files_name_the_file_and_row(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_instructions(str(tmp_path / "bad.json"))
    assert "\n" not in str(e.value)


def test_missing_file_or_folder(tmp_path):
    with pytest.raises(DataError, match="no-such.json: no such file or folder"):
        load_instructions(str(tmp_path / "no-such.json"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_instructions("no-such-name")


def test_hub_datasets_are_normalized(monkeypatch):
    requested = []

    def fake_load_dataset(name, split):
        requested.append((name, split))
        return datasets.Dataset.from_list(
            [
                {"instruction": "i", "context": "c", "response": "r", "category": "open_qa"},
            ]
        )

    monkeypatch.setattr(instructions.datasets, "load_dataset", fake_load_dataset)
    ds = load_instructions("dolly")
    assert requested == [("databricks/databricks-dolly-15k", "train")]
    assert ds[0] == {"instruction": "i", "input": "c", "output": "r", "category": "open_qa"}


def test_hub_failure_is_one_line(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(instructions.datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"^cannot load dataset 'tatsu-lab/alpaca' from the Hugging Face hub: Couldn't reach"
    ) as e:
        load_instructions("tatsu-lab/alpaca")
    assert "\n" not in str(e.value)


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(
    instruction=text,
    extra=text,
    output=text,
    key=st.sampled_from(["input", "context", None]),
    out_key=st.sampled_from(["output", "response"]),
    category=st.one_of(st.none(), text),
)
def test_normalized_rows_keep_every_field(instruction, extra, output, key, out_key, category):
    row = {"instruction": instruction, out_key: output}
    if key:
        row[key] = extra
    if category is not None:
        row["category"] = category
    assert normalize_row(row) == {
        "instruction": instruction,
        "input": extra if key else "",
        "output": output,
        "category": category or "",
    }


# --- prompts and tokens ----------------------------------------------------------------------------------------------


def test_alpaca_prompts_match_the_papers_template():
    assert build_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert build_prompt("Translate.", "Hello") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate.\n\n### Input:\nHello\n\n### Response:\n"
    )


def test_chat_prompt_uses_the_tokenizers_template(tokenizer):
    prompt = build_prompt("Translate.", "Hello", template="chat", tokenizer=tokenizer)
    assert "Translate.\n\nHello" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        build_prompt("x", template="chat")
    with pytest.raises(DataError, match="unknown template 'vicuna'"):
        build_prompt("x", template="vicuna")


def test_tokenized_rows_end_in_eos_and_learn_everything(tokenizer):
    ds = instructions.from_rows(ALPACA_ROWS, "rows")
    out = tokenize_dataset(ds, tokenizer)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    for row, source in zip(out, ALPACA_ROWS, strict=True):
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        assert row["labels"] == row["input_ids"]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        text = tokenizer.decode(row["input_ids"])
        assert text == build_prompt(source["instruction"], source["input"]) + source["output"] + tokenizer.eos_token


def test_train_on_inputs_false_masks_the_prompt(tokenizer):
    ds = instructions.from_rows(ALPACA_ROWS, "rows")
    out = tokenize_dataset(ds, tokenizer, train_on_inputs=False)
    for row, source in zip(out, ALPACA_ROWS, strict=True):
        learned = [t for t in row["labels"] if t != LOSS_IGNORED]
        assert row["labels"][: len(row["labels"]) - len(learned)] == [LOSS_IGNORED] * (
            len(row["labels"]) - len(learned)
        )
        assert tokenizer.decode(learned) == source["output"] + tokenizer.eos_token


def test_cutoff_truncates_and_drops_rows_with_nothing_to_learn(tokenizer):
    ds = instructions.from_rows([{"instruction": "word " * 100, "output": "short"}, *ALPACA_ROWS], "rows")
    out = tokenize_dataset(ds, tokenizer, cutoff=60)
    assert len(out) == 3
    assert len(out[0]["input_ids"]) == 60
    assert out[0]["input_ids"][-1] != tokenizer.eos_token_id  # a cut text does not end
    masked = tokenize_dataset(ds, tokenizer, cutoff=60, train_on_inputs=False)
    assert len(masked) == 2  # the long prompt leaves no response token within the cutoff


def test_chat_template_tokenization(tokenizer):
    ds = instructions.from_rows(ALPACA_ROWS[:1], "rows")
    out = tokenize_dataset(ds, tokenizer, template="chat", train_on_inputs=False)
    text = tokenizer.decode(out[0]["input_ids"])
    assert text.startswith("<|im_start|>system") and text.endswith(ALPACA_ROWS[0]["output"] + "<|im_end|>")
    assert (
        tokenizer.decode([t for t in out[0]["labels"] if t != LOSS_IGNORED]) == ALPACA_ROWS[0]["output"] + "<|im_end|>"
    )


def test_tokenize_needs_the_schema(tokenizer):
    with pytest.raises(DataError, match="lacks column 'input'"):
        tokenize_dataset(datasets.Dataset.from_dict({"instruction": ["i"], "output": ["o"]}), tokenizer)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.fixed_dictionaries({"instruction": text, "input": text, "output": text}), min_size=1, max_size=4),
    cutoff=st.integers(2, 80),
    train_on_inputs=st.booleans(),
)
def test_tokenization_invariants(tokenizer, rows, cutoff, train_on_inputs):
    out = tokenize_dataset(
        instructions.from_rows(rows, "rows"), tokenizer, cutoff=cutoff, train_on_inputs=train_on_inputs
    )
    assert len(out) <= len(rows)
    if train_on_inputs:
        assert len(out) == len(rows)
    for row in out:
        n = len(row["input_ids"])
        assert 0 < n <= cutoff
        assert len(row["labels"]) == len(row["attention_mask"]) == n
        learned = [i for i, t in enumerate(row["labels"]) if t != LOSS_IGNORED]
        assert learned and learned == list(range(learned[0], n))  # a masked prefix, then the tokens themselves
        assert [row["labels"][i] for i in learned] == row["input_ids"][learned[0] :]


# --- partitioning ----------------------------------------------------------------------------------------------------


def rows_of(clients):
    return Counter(r["instruction"] for c in clients for r in c)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_is_reproducible_and_loses_nothing(scheme):
    ds = small_dataset({"a": 40, "b": 25, "c": 20, "d": 15})
    first = partition(ds, 4, scheme, seed=3)
    again = partition(ds, 4, scheme, seed=3)
    other = partition(ds, 4, scheme, seed=4)
    assert [c["instruction"] for c in first] == [c["instruction"] for c in again]
    assert [c["instruction"] for c in first] != [c["instruction"] for c in other]
    assert rows_of(first) == Counter(ds["instruction"])
    assert all(len(c) > 0 for c in first)
    assert all(tuple(c.column_names) == COLUMNS for c in first)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_one_clients_part_is_its_part_of_the_whole_split(scheme):
    ds = small_dataset({"a": 40, "b": 25, "c": 20, "d": 15})
    whole = partition(ds, 6, scheme, seed=2)
    for k in range(6):
        assert partition_of(ds, 6, k, scheme, seed=2)["instruction"] == whole[k]["instruction"]
    with pytest.raises(DataError, match="client 6 is out of range"):
        partition_of(ds, 6, 6, scheme, seed=2)


def test_load_client_reads_one_file_of_a_folder_and_one_part_of_a_file(tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    for k in range(3):
        (folder / f"client_{k}.json").write_text(json.dumps([{**ALPACA_ROWS[0], "output": f"client {k}"}]))
    assert load_client(str(folder), 3, 1)["output"] == ["client 1"]
    with pytest.raises(DataError, match="holds 3 client files, but 4"):
        load_client(str(folder), 4, 1)
    pooled = load_clients(str(folder), 2, "iid", seed=0, resplit=True)  # three files' rows over two clients
    assert sorted(o for c in pooled for o in c["output"]) == ["client 0", "client 1", "client 2"]
    assert load_client(str(folder), 2, 1, "iid", seed=0, resplit=True)["output"] == pooled[1]["output"]
    whole = load_clients("builtin", 5, "dirichlet", 0.5, seed=1)
    assert load_client("builtin", 5, 3, "dirichlet", 0.5, seed=1)["instruction"] == whole[3]["instruction"]


def test_iid_clients_have_equal_sizes():
    sizes = [len(c) for c in partition(small_dataset({"a": 50, "b": 53}), 4, "iid")]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=20, deadline=None)
@given(num_clients=st.integers(1, 6), seed=st.integers(0, 1000), scheme=st.sampled_from(["iid", "dirichlet", "shards"]))
def test_any_split_is_a_partition(num_clients, seed, scheme):
    ds = small_dataset({"a": 30, "b": 20, "c": 10})
    try:
        clients = partition(ds, num_clients, scheme, seed=seed)
    except DataError:
        return  # a draw that cannot give every client a row is refused, never returned
    assert len(clients) == num_clients
    assert all(len(c) > 0 for c in clients)
    assert rows_of(clients) == Counter(ds["instruction"])


def test_dirichlet_is_non_iid_and_alpha_controls_it():
    ds = small_dataset({c: 60 for c in "abcdefgh"})
    iid = heterogeneity(partition(ds, 8, "iid"))
    skewed = heterogeneity(partition(ds, 8, "dirichlet", alpha=0.5))
    nearly_iid = heterogeneity(partition(ds, 8, "dirichlet", alpha=1000.0))
    assert skewed > 2 * iid
    assert skewed > 2 * nearly_iid
    assert heterogeneity(partition(ds, 8, "shards")) > iid


def test_heterogeneity_bounds():
    ds = small_dataset({"a": 4, "b": 4})
    assert heterogeneity([ds]) == 0
    split = [ds.filter(lambda r, c=c: r["category"] == c) for c in "ab"]
    assert heterogeneity(split) == pytest.approx(0.5)


def test_partition_errors():
    ds = small_dataset({"a": 3, "b": 2})
    with pytest.raises(DataError, match="5 rows cannot fill 6 clients"):
        partition(ds, 6, "iid")
    with pytest.raises(DataError, match="at least 1"):
        partition(ds, 0)
    with pytest.raises(DataError, match="unknown partition scheme 'random'"):
        partition(ds, 2, "random")
    with pytest.raises(DataError, match="needs column 'label'"):
        partition(ds, 2, "dirichlet", column="label")
    with pytest.raises(DataError, match="alpha must be positive"):
        partition(ds, 2, "dirichlet", alpha=0)


def test_dirichlet_that_cannot_fill_every_client_is_an_error():
    with pytest.raises(DataError, match=r"dirichlet split of 10 rows over 8 clients failed"):
        partition(small_dataset({"a": 5, "b": 5}), 8, "dirichlet", alpha=0.05, min_size=1)


def test_load_clients_keeps_a_folder_as_it_is(shared_data):
    folder = str(shared_data / "dolly")
    assert [len(c) for c in load_clients(folder)] == [len(c) for c in load_client_folder(folder)]
    with pytest.raises(DataError, match="holds 8 client files, but 4 clients were asked for"):
        load_clients(folder, 4)


def test_load_clients_partitions_a_file(tmp_path):
    path = write_json(tmp_path / "train.json", [{"instruction": f"q{i}", "output": "a"} for i in range(20)])
    clients = load_clients(str(path), 4, "iid")
    assert [len(c) for c in clients] == [5, 5, 5, 5]


def test_summary_table_lists_every_client():
    clients = partition(small_dataset({"a": 10, "b": 6}), 3, "iid")
    table = summary_table(clients, title="t")
    assert table.row_count == 4  # three clients and the total
    assert [cell for cell in table.columns[1].cells] == [str(len(c)) for c in clients] + ["16"]


# --- command line ----------------------------------------------------------------------------------------------------


def run_cli(*args):
    from florist.cli import app

    return CliRunner().invoke(app, ["data", "summary", *args])


def test_cli_summary_of_a_client_folder(shared_data):
    result = run_cli("--data", str(shared_data / "dolly"))
    assert result.exit_code == 0, result.output
    assert "8 clients (as split in its files)" in result.output
    assert "3775" in result.output and "14935" in result.output


def test_cli_summary_partitions_a_file(tmp_path):
    path = write_json(
        tmp_path / "train.json", [{"instruction": f"q{i}", "output": "a", "category": "xy"[i % 2]} for i in range(30)]
    )
    result = run_cli("--data", str(path), "--clients", "3", "--partition", "iid", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "3 clients (iid, seed 1)" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--data", "missing.json"), "florist: missing.json: no such file or folder"),
        (
            ("--data", "{bad}", "--partition", "random"),
            "florist: --partition 'random': choose from iid, dirichlet, shards",
        ),
        (("--data", "{bad}"), "none of the known columns"),
        (
            ("--data", "{small}", "--clients", "4", "--partition", "dirichlet", "--alpha", "0.01"),
            "florist: dirichlet split of 5 rows over 4 clients failed",
        ),
        (("--data", "{small}", "--clients", "9", "--partition", "iid"), "florist: 5 rows cannot fill 9 clients"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    write_json(tmp_path / "bad.json", [{"question": "q"}])
    write_json(
        tmp_path / "small.json", [{"instruction": f"q{i}", "output": "a", "category": "ab"[i % 2]} for i in range(5)]
    )
    args = [a.format(bad=tmp_path / "bad.json", small=tmp_path / "small.json") for a in args]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
