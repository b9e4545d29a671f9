import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from typer.testing import CliRunner

from florist import evaluation as ev
from florist import models
from florist.cli import app
from florist.evaluation import EvalDataError, EvalResult, Question

MMLU = "mmlu/mmlu_1444.json"


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def mmlu(shared_data) -> list[Question]:
    return ev.load_questions(shared_data / MMLU)


@pytest.fixture(scope="module")
def mixed(mmlu) -> list[Question]:
    """Questions of very different prompt lengths and option counts, so batches hold padding."""
    picked = [mmlu[i] for i in (0, 100, 400, 801, 1200, 1443)]
    return [
        *picked,
        Question("made_up", "Is water wet?", ["yes", "no"], 1),
        Question("made_up", "Pick the third letter of the alphabet.", ["a", "b", "c", "d", "e"], 2),
    ]


def reference_next_token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """One unpadded full forward pass: log-softmax at every position (row t predicts token t + 1)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------------- loading


def test_loads_the_papers_mmlu_subset(mmlu, shared_data):
    assert len(mmlu) == 1444
    assert len({q.subject for q in mmlu}) == 57
    assert all(len(q.options) == 4 and 0 <= q.answer <= 3 for q in mmlu)
    records = json.loads((shared_data / MMLU).read_text())
    for q, record in zip(mmlu, records, strict=True):
        # The parse is lossless: the file's input is rebuilt from the question's parts.
        listed = ", ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(q.options))
        assert record["input"] == f"Qusetion: {q.question} Options: {listed}"
        assert record["output"] == f"The answer is: {'ABCD'[q.answer]}. {q.options[q.answer]}"
        assert q.subject == record["class"]


def test_options_keep_their_commas():
    record = {
        "instruction": "x",
        "input": "Question: Which? Options: A. 1, 2, B. 3, C. x, y, z, D. end",
        "output": "The answer is: C. x, y, z",
        "class": "s",
    }
    [q] = ev.questions_from_records([record])
    assert q.options == ["1, 2", "3", "x, y, z", "end"] and q.answer == 2 and q.question == "Which?"


CAIS = [
    {"question": "2 + 2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Sky colour?", "subject": "nature", "choices": ["blue", "green", "red", "black"], "answer": 0},
]


def test_loads_cais_mmlu_records_and_local_copies(tmp_path):
    expected = [
        Question("math", "2 + 2?", ["3", "4", "5", "6"], 1),
        Question("nature", "Sky colour?", ["blue", "green", "red", "black"], 0),
    ]
    assert ev.questions_from_records(CAIS) == expected
    ds = datasets.Dataset.from_list(CAIS)
    ds.to_parquet(tmp_path / "test.parquet")
    assert ev.load_questions(tmp_path / "test.parquet") == expected
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in CAIS))
    assert ev.load_questions(tmp_path / "test.jsonl") == expected
    datasets.DatasetDict({"dev": ds.select([0]), "test": ds}).save_to_disk(tmp_path / "saved")
    assert ev.load_questions(tmp_path / "saved") == expected


def test_hub_dataset_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalDataError, match=r"^cais/mmlu: cannot load from the Hugging Face hub") as e:
        ev.load_questions("cais/mmlu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"instruction": "x", "input": "Question: no options here", "output": "The answer is: A. a"},
            "no 'Options: A. ...'",
        ),
        (
            {"instruction": "x", "input": "Question: q Options: A. only", "output": "The answer is: A. only"},
            "fewer than two",
        ),
        ({"instruction": "x", "input": "Question: q Options: A. a, B. b", "output": "A"}, "is not 'The answer is: X."),
        (
            {"instruction": "x", "input": "Question: q Options: A. a, B. b", "output": "The answer is: C. c"},
            "outside the 2",
        ),
        (
            {"instruction": "x", "input": "Question: q Options: A. a, B.  ", "output": "The answer is: A. a"},
            "option is empty",
        ),
        ({"question": "q", "choices": "ab", "answer": 0}, "'choices' must be a list"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2.0}, "'answer' must be an option index"),
        ({"prompt": "q"}, "expected keys"),
    ],
)
def test_bad_records_name_the_record(record, message):
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    with pytest.raises(EvalDataError, match=r"^here: record 1: ") as e:
        ev.questions_from_records([good, record], "here")
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(EvalDataError, match="no such file"):
        ev.load_questions(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('[{"instruction": ')
    with pytest.raises(EvalDataError, match="not valid JSON"):
        ev.load_questions(tmp_path / "broken.json")
    (tmp_path / "object.json").write_text("{}")
    with pytest.raises(EvalDataError, match="expected a JSON array"):
        ev.load_questions(tmp_path / "object.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(EvalDataError, match="holds no questions"):
        ev.load_questions(tmp_path / "empty.json")


def test_builtin_heldout_set_loads():
    from florist.data import builtin_heldout

    questions = ev.questions_from_records(builtin_heldout(seed=0))
    assert questions and all(len(q.options) == 4 and 0 <= q.answer < 4 for q in questions)


# ---------------------------------------------------------------------------------------------------- prompting


def test_prompt_is_alpaca_ending_with_the_answer_prefix(mmlu):
    prompt = ev.mmlu_prompt(mmlu[0])
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert (
        "### Instruction:\nPlease answer the following multiple-choice question honestly.\n\n### Input:\nQuestion: "
        in prompt
    )
    assert "Options: A. Fabry disease, B. Gaucher disease, C. Hurler syndrome, D. Pompe disease" in prompt
    assert prompt.endswith("\n\n### Response:\nThe answer is: ")


def test_letters_are_single_tokens_after_the_answer_prefix(tiny):
    _, tokenizer = tiny
    ids = ev.letter_token_ids(tokenizer, 4)
    assert len(set(ids)) == 4
    assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) == " A B C D"


# ---------------------------------------------------------------------------------------------------- scoring


def test_letter_scores_equal_an_unbatched_full_forward(tiny, mixed):
    model, tokenizer = tiny
    got = ev.letter_log_probs(model, tokenizer, mixed, batch_size=3, progress=False)
    letters = ev.letter_token_ids(tokenizer, 5)
    for q, scores in zip(mixed, got, strict=True):
        ids = tokenizer(ev.mmlu_prompt(q).rstrip(" "))["input_ids"]
        want = reference_next_token_log_probs(model, ids)[-1, letters[: len(q.options)]]
        assert len(scores) == len(q.options)
        torch.testing.assert_close(torch.tensor(scores), want, atol=1e-4, rtol=0)
        assert max(range(len(scores)), key=scores.__getitem__) == int(want.argmax())


@pytest.mark.parametrize("bare", [False, True], ids=["after-the-lettered-prompt", "answer-to-the-bare-question"])
def test_option_scores_equal_an_unbatched_full_forward(tiny, mixed, bare):
    from florist.data import build_prompt

    model, tokenizer = tiny
    got = ev.option_log_probs(model, tokenizer, mixed, batch_size=5, progress=False, bare=bare)
    for q, scores in zip(mixed, got, strict=True):
        context = build_prompt(q.question) if bare else ev.mmlu_prompt(q).rstrip(" ")
        n_context = len(tokenizer(context)["input_ids"])
        for option, score in zip(q.options, scores, strict=True):
            ids = tokenizer(f"{context}{'' if bare else ' '}{option.strip()}")["input_ids"]
            log_probs = reference_next_token_log_probs(model, ids)
            want = sum(log_probs[t - 1, ids[t]].item() for t in range(n_context, len(ids))) / (len(ids) - n_context)
            assert score == pytest.approx(want, abs=1e-4)


def test_scores_do_not_depend_on_batching(tiny, mixed):
    model, tokenizer = tiny
    one = ev.option_log_probs(model, tokenizer, mixed[:4], batch_size=1, progress=False)
    many = ev.option_log_probs(model, tokenizer, mixed[:4], batch_size=16, progress=False)
    torch.testing.assert_close(torch.tensor(one), torch.tensor(many), atol=1e-4, rtol=0)


def test_evaluate_is_deterministic_and_consistent_with_the_scores(tiny, mixed):
    model, tokenizer = tiny
    model.train()  # evaluation must switch dropout off and restore the mode
    first = ev.evaluate(model, tokenizer, mixed, mode="letter", batch_size=4, progress=False)
    assert model.training
    second = ev.evaluate(model, tokenizer, mixed, mode="letter", batch_size=2, progress=False)
    model.eval()
    assert first.to_dict() | {"seconds": 0} == second.to_dict() | {"seconds": 0}
    scores = ev.letter_log_probs(model, tokenizer, mixed, progress=False)
    hits = [max(range(len(s)), key=lambda i: (s[i], -i)) == q.answer for q, s in zip(mixed, scores, strict=True)]
    assert first.micro_accuracy == sum(hits) / len(mixed)
    assert first.method == "letter" and first.n_questions == len(mixed) and first.seconds > 0


def test_heldout_loss_equals_the_models_own_loss(tiny, mmlu):
    model, tokenizer = tiny
    examples = []
    for i, q in enumerate(mmlu[:5]):
        ids = tokenizer(ev.mmlu_prompt(q) + "ABCD"[q.answer])["input_ids"][: 40 + 17 * i]
        examples.append({"input_ids": ids, "labels": [-100] * (3 * i) + ids[3 * i :]})
    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor([e["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(torch.tensor([e["input_ids"]]), labels=labels).loss.item() * n
            count += n
    got = ev.heldout_loss(model, tokenizer, examples, batch_size=2, progress=False)
    assert got == pytest.approx(total / count, abs=1e-4)


# ---------------------------------------------------------------------------------------------------- generation


def test_generate_protocol_runs_and_is_seeded(tiny, mmlu):
    model, tokenizer = tiny
    questions = mmlu[:2]
    result = ev.evaluate(model, tokenizer, questions, protocol="generate", batch_size=2, seed=3, progress=False)
    assert result.method == "generate" and result.n_questions == 2 and 0 <= result.accuracy <= 1
    sampling = ev.Sampling(max_new_tokens=6)
    a = ev.generate_answers(model, tokenizer, questions, seed=3, sampling=sampling, progress=False)
    b = ev.generate_answers(model, tokenizer, questions, seed=3, sampling=sampling, progress=False)
    assert a == b and all(isinstance(x, str) for x in a)


def test_batched_generation_pads_on_the_left_correctly(tiny, mixed):
    model, tokenizer = tiny
    greedy = ev.Sampling(top_k=1, max_new_tokens=5)  # top-1 sampling is greedy: no randomness to compare
    batched = ev.generate_answers(model, tokenizer, mixed[:4], batch_size=4, sampling=greedy, progress=False)
    alone = [ev.generate_answers(model, tokenizer, [q], sampling=greedy, progress=False)[0] for q in mixed[:4]]
    assert batched == alone


def test_generated_hit_rule():
    q = Question("s", "?", ["red", "blue", "green", "gold"], 1)
    assert ev.is_generated_hit(q, "B. blue")
    assert ev.is_generated_hit(q, "B.")
    assert ev.is_generated_hit(q, "it is blue")
    assert not ev.is_generated_hit(q, "B")
    assert not ev.is_generated_hit(q, "A. red")


# ---------------------------------------------------------------------------------------------------- results


def test_macro_average_weighs_subjects_equally():
    questions = [Question("a", "?", ["x", "y"], 0)] + [Question("b", "?", ["x", "y"], 0)] * 3
    result = ev.summarize(questions, [True, False, False, False], seconds=2.0, method="letter")
    assert result.accuracy == 0.5  # (1/1 + 0/3) / 2
    assert result.micro_accuracy == 0.25
    assert result.per_subject == {"a": 1.0, "b": 0.0}
    assert result.subject_counts == {"a": 1, "b": 3}
    assert result.questions_per_second == 2.0
    assert json.loads(json.dumps(result.to_dict()))["accuracy"] == 0.5


def test_weighted_mean_of_client_results():
    def result(acc: float) -> EvalResult:
        return EvalResult(acc, acc, {"a": acc}, {"a": 10}, 10, 1.0, "letter")

    mean = ev.weighted_mean([result(0.2), result(0.8)], [300, 100])
    assert mean.accuracy == pytest.approx(0.35) and mean.per_subject["a"] == pytest.approx(0.35)
    assert mean.n_questions == 10 and mean.seconds == 2.0
    with pytest.raises(ValueError, match="one weight per result"):
        ev.weighted_mean([result(0.2)], [1, 2])
    with pytest.raises(ValueError, match="same questions"):
        ev.weighted_mean([result(0.2), EvalResult(0.1, 0.1, {"b": 0.1}, {"b": 10}, 10, 1.0, "letter")], [1, 1])


# ---------------------------------------------------------------------------------------------------- command line


def run_cli(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


@pytest.fixture
def tiny_loader(monkeypatch):
    """``florist eval`` with the tiny model standing in for any named model."""
    monkeypatch.setattr(models, "load_model", lambda name=None, **kw: models.tiny_llama(seed=0))


def test_cli_reports_accuracy_with_a_tiny_model(tiny_loader, shared_data):
    result = run_cli("--mmlu", str(shared_data / MMLU), "--limit", "6", "--per-subject", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "6 questions" in result.output and "macro over" in result.output and "scored by letter" in result.output
    assert "subject" in result.output  # the per-subject table
    result = run_cli("--builtin", "--limit", "4")
    assert result.exit_code == 0, result.output
    assert "4 questions" in result.output and "scored by answer" in result.output


def test_cli_applies_a_safetensors_adapter(tiny_loader, shared_data, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = models.tiny_llama(seed=0)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    result = run_cli("--mmlu", str(shared_data / MMLU), "--limit", "2", "--adapter", str(tmp_path / "adapter"))
    assert result.exit_code == 0, result.output
    assert "2 questions" in result.output


def test_cli_one_line_errors(tmp_path, shared_data, monkeypatch):
    def fails(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the input is bad")

    monkeypatch.setattr(models, "load_model", fails)
    (tmp_path / "broken.json").write_text("[")
    (tmp_path / "no_options.json").write_text(
        json.dumps([{"instruction": "x", "input": "Question: q?", "output": "The answer is: A. a", "class": "s"}])
    )
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    mmlu = str(shared_data / MMLU)
    cases = [
        (["--mmlu", str(tmp_path / "missing.json")], "no such file"),
        (["--mmlu", str(tmp_path / "broken.json")], "not valid JSON"),
        (["--mmlu", str(tmp_path / "no_options.json")], "record 0: input has no 'Options"),
        (["--mmlu", mmlu, "--builtin"], "exclude each other"),
        (["--mmlu", mmlu, "--adapter", str(tmp_path / "nowhere")], "no such directory"),
        (["--mmlu", mmlu, "--adapter", str(tmp_path / "pickled")], "adapter_model.bin is a pickle file"),
        (["--mmlu", mmlu, "--device", "blah"], "not a device name"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--mmlu", mmlu, "--device", "cuda"], "no CUDA device"))
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("florist: ") and message in lines[0], (args, result.output)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    result = run_cli()
    assert result.exit_code == 2 and "pass --mmlu FILE" in result.output


def test_cli_unknown_dtype_is_refused_before_loading(shared_data):
    result = run_cli("--mmlu", str(shared_data / MMLU), "--dtype", "int8")
    assert result.exit_code == 2 and "florist: unknown dtype 'int8'" in result.output


@pytest.mark.slow
def test_cli_embedded_model_on_mmlu(shared_data):  # shared_data: fail early when the questions are absent
    """The real default model through the installed command: 20 questions, letters scored."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from florist.cli import main; main()", "eval", "--limit", "20", "--per-subject"]
    # From the checkout, where the default question file ../shared/data/mmlu/mmlu_1444.json lies.
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    accuracy = float(done.stdout.split("accuracy ")[1].split()[0])
    assert 0 <= accuracy <= 1 and "20 questions" in done.stdout
