import json
import re
from collections import Counter, defaultdict

import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from florist.data import (
    COLUMNS,
    builtin_heldout,
    builtin_heldout_answers,
    builtin_train,
    heterogeneity,
    load_clients,
    load_instructions,
    partition,
)
from florist.data.builtin import CATEGORIES, FACTS_PER_CATEGORY, facts

QUESTION = re.compile(r"^Question: (?P<q>.*?) Options: A\. (?P<A>.*?), B\. (?P<B>.*?), C\. (?P<C>.*?), D\. (?P<D>.*)$")
ANSWER = re.compile(r"^The answer is: (?P<letter>[A-D])\. (?P<text>.*)$")


def parsed(row):
    q, a = QUESTION.match(row["input"]), ANSWER.match(row["output"])
    assert q and a, row
    options = [q[letter] for letter in "ABCD"]
    return q["q"], options, "ABCD".index(a["letter"]), a["text"]


def test_train_set_shape_and_determinism():
    ds = builtin_train()
    assert tuple(ds.column_names) == COLUMNS
    assert len(ds) == len(CATEGORIES) * FACTS_PER_CATEGORY * 3
    assert Counter(ds["category"]) == {c.name: FACTS_PER_CATEGORY * 3 for c in CATEGORIES}
    assert ds.to_list() == builtin_train(0).to_list()
    assert ds.to_list() != builtin_train(1).to_list()
    assert load_instructions("builtin").to_list() == ds.to_list()
    assert load_instructions("builtin", seed=1).to_list() == builtin_train(1).to_list()


def test_every_entity_is_invented_once():
    all_facts = facts()
    entities = [f.entity for f in all_facts]
    assert len(set(entities)) == len(entities)
    for fact in all_facts:
        assert fact.value in fact.category.values
        assert len({fact.value, *fact.distractors}) == 4
        assert set(fact.distractors) <= set(fact.category.values)


def test_heldout_has_the_mmlu_shape(shared_data):
    mmlu = json.loads((shared_data / "mmlu" / "mmlu_1444.json").read_text())
    rows = builtin_heldout()
    assert len(rows) == len(facts())
    assert all(row.keys() == mmlu[0].keys() for row in rows)
    assert {row["instruction"] for row in rows} == {mmlu[0]["instruction"]}
    assert Counter(row["class"] for row in rows) == {c.name: FACTS_PER_CATEGORY for c in CATEGORIES}
    assert rows == builtin_heldout(0) and rows != builtin_heldout(1)


def test_project_evaluator_reads_the_heldout_set():
    from florist.evaluation import questions_from_records

    questions = questions_from_records(builtin_heldout(), "builtin")
    assert [q.answer for q in questions] == [parsed(row)[2] for row in builtin_heldout()]
    assert all(len(q.options) == 4 for q in questions)


def test_heldout_asks_about_training_facts_in_new_words():
    train = builtin_train()
    instructions, outputs = set(train["instruction"]), train["output"]
    responses_about = {fact.entity: [r for r in outputs if fact.entity in r] for fact in facts()}
    letters = Counter()
    for row, fact in zip(builtin_heldout(), facts(), strict=True):
        question, options, answer, text = parsed(row)
        assert question not in instructions  # phrased unlike any training row
        assert fact.entity in question
        assert options[answer] == text == fact.value
        assert all(fact.value in r for r in responses_about[fact.entity])  # every phrasing states the answer
        assert all(o not in r for o in set(options) - {fact.value} for r in responses_about[fact.entity])
        letters[answer] += 1
    assert len(set(letters.values())) == 1  # each letter is right equally often


def test_dirichlet_split_gives_each_client_knowledge_the_others_lack():
    clients = partition(builtin_train(), 8, "dirichlet", alpha=0.5, seed=0)
    entities = [f.entity for f in facts()]
    holders = defaultdict(set)
    for k, client in enumerate(clients):
        for instruction in client["instruction"]:
            holders[next(e for e in entities if e in instruction)].add(k)
    assert len(holders) == len(facts())
    exclusive = Counter(next(iter(h)) for h in holders.values() if len(h) == 1)
    assert set(exclusive) == set(range(8))  # every client holds facts that no other client has seen
    iid = partition(builtin_train(), 8, "iid", seed=0)
    assert heterogeneity(clients) > 2 * heterogeneity(iid)


def test_load_clients_builtin_matches_the_heldout_seed():
    clients = load_clients("builtin", 4, "dirichlet", 0.5, seed=5)
    entities = {f.entity for f in facts(5)}
    assert all(any(e in row for e in entities) for c in clients for row in c["instruction"])


def test_cli_summary_of_builtin():
    from florist.cli import app

    result = CliRunner().invoke(app, ["data", "summary", "--clients", "8"])
    assert result.exit_code == 0, result.output
    assert "builtin: 8 clients (dirichlet, alpha 0.5, seed 0)" in result.output
    assert "360" in result.output


# --- it teaches the embedded model something -------------------------------------------------------------------------


def option_accuracy(model, tokenizer, rows) -> tuple[float, float]:
    """Accuracy and mean margin (right option minus the best wrong one) when each option's text is scored as the
    response to the bare question: its mean token log-probability after the Alpaca prompt of the question."""
    from florist.data import build_prompt

    hits, margins = 0, []
    model.eval()
    for row in rows:
        question, options, answer, _ = parsed(row)
        context = build_prompt(question)
        n_context = len(tokenizer(context)["input_ids"])
        seqs = [tokenizer(context + option)["input_ids"] for option in options]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        scores = []
        for j, s in enumerate(seqs):
            target = torch.tensor(s[n_context:])
            scores.append(logp[j, n_context - 1 : len(s) - 1].gather(-1, target[:, None]).mean().item())
        hits += max(range(4), key=scores.__getitem__) == answer
        margins.append(scores[answer] - max(v for i, v in enumerate(scores) if i != answer))
    return hits / len(rows), sum(margins) / len(margins)


def train_lora(model, examples, pad_id: int, epochs: int, lr: float, batch_size: int = 8):
    """A plain LoRA loop with the paper's adapter (r=16, alpha=32, dropout 0.05 on q_proj and v_proj), AdamW, seeded."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    order = torch.Generator().manual_seed(0)
    peft_model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(examples), generator=order).tolist()
        for start in range(0, len(perm), batch_size):
            rows = [examples[i] for i in perm[start : start + batch_size]]
            width = max(len(r["input_ids"]) for r in rows)

            def padded(key, value, rows=rows, width=width):
                return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

            loss = peft_model(
                input_ids=padded("input_ids", pad_id),
                attention_mask=padded("attention_mask", 0),
                labels=padded("labels", -100),
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return peft_model


@pytest.mark.slow
def test_embedded_model_learns_the_facts_it_is_taught():
    """A short LoRA run on two categories makes the held-out answers about them more likely than before.

    Seen (2 categories, 90 rows, 4 epochs, r=16 on q_proj/v_proj, lr 1e-3, float32): accuracy 0.167 -> 0.367 on
    30 questions, mean margin -2.05 -> -1.78.
    """
    from florist.data import tokenize_dataset
    from florist.models import load_model

    taught = {"national_animal", "instrument"}
    model, tokenizer = load_model()
    train = builtin_train().filter(lambda row: row["category"] in taught)
    questions = [row for row in builtin_heldout() if row["class"] in taught]
    before, margin_before = option_accuracy(model, tokenizer, questions)
    trained = train_lora(model, tokenize_dataset(train, tokenizer), tokenizer.pad_token_id, epochs=4, lr=1e-3)
    after, margin_after = option_accuracy(trained, tokenizer, questions)
    print(
        f"option accuracy on {len(questions)} questions: {before:.3f} -> {after:.3f}; "
        f"margin {margin_before:.3f} -> {margin_after:.3f}"
    )
    assert after > before
    assert margin_after > margin_before


def test_heldout_answers_ask_the_test_questions_and_score_only_the_answers():
    from florist.config import load_config
    from florist.models import tiny_llama
    from florist.setup import _heldout

    answers = builtin_heldout_answers()
    trained = set(builtin_train()["instruction"])
    assert len(answers) == len(builtin_heldout()) and not trained & set(answers["instruction"])
    _, tokenizer = tiny_llama(0)
    default = _heldout(load_config(None, []), tokenizer)  # data.train = "builtin", eval.heldout = "auto"
    assert len(default) == len(answers)
    for example, row in zip(default, answers):
        scored = [t for t in example["labels"] if t != -100]
        assert tokenizer.decode(scored).strip().startswith(row["output"])  # the value (and end of text), no prompt
    assert _heldout(load_config(None, ['data.train="dolly"']), tokenizer) == []  # auto: none for other data
