"""Evaluators on the trained skill family: accuracy, perplexity, lm_eval, command; identities."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import textwrap

import pytest
import torch

from mergebuild.errors import EvaluationError
from mergebuild.evaluate import EVALUATOR_VERSION, KINDS, definition_from_params, evaluate
from mergebuild.evaluate.accuracy import AccuracyEval
from mergebuild.evaluate.command import CommandEval
from mergebuild.evaluate.harness import LmEvalTask
from mergebuild.evaluate.perplexity import PerplexityEval, windows
from mergebuild.sources.skills import SKILL_DATA, SKILLS, generate_skill_models


@pytest.fixture(scope="session")
def skill_models(tmp_path_factory):
    return generate_skill_models(tmp_path_factory.mktemp("skills") / "models")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: a second thread only adds synchronisation, which costs 10x
    # on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_lines(source, target, count):
    lines = source.read_text(encoding="utf-8").splitlines()[:count]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("skill", SKILLS)
def test_each_fine_tune_has_its_skill_and_the_others_do_not(skill, skill_models):
    definition = AccuracyEval(SKILL_DATA / f"{skill}.jsonl", max_new_tokens=8, batch_size=200)
    scores = {name: evaluate(path, definition, device="cpu") for name, path in skill_models.items()}
    assert all(result["n"] == 200 for result in scores.values())
    assert scores[skill]["accuracy"] >= 0.8
    assert all(scores[name]["accuracy"] <= 0.2 for name in scores if name != skill)


def test_accuracy_counts_right_and_wrong_answers_exactly(skill_models, tmp_path):
    data = tmp_path / "hand.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "12+7=", "answer": "19"},
        {"prompt": "12+7=", "answer": "20"},
        {"prompt": "40+5=", "answer": " 45 "},  # compared stripped
        {"prompt": "40+5=", "answer": "45", "choices": ["45", "46", "54"]},
    ]) + "\n")
    assert evaluate(skill_models["math"], AccuracyEval(data), device="cpu") == {
        "accuracy": 0.75, "n": 4.0}


def test_multiple_choice_picks_the_likeliest_choice(skill_models, tmp_path):
    data = _first_lines(SKILL_DATA / "chat_choices.jsonl", tmp_path / "mc.jsonl", 40)
    chat = evaluate(skill_models["chat"], AccuracyEval(data), device="cpu")
    base = evaluate(skill_models["base"], AccuracyEval(data), device="cpu")
    assert chat == {"accuracy": 1.0, "n": 40.0}
    assert base["accuracy"] < 0.6


def test_accuracy_rejects_malformed_lines(skill_models, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "x"}\n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl:2: needs string fields"):
        evaluate(skill_models["math"], AccuracyEval(data), device="cpu")
    data.write_text('{"prompt": "1+1=", "answer": "2", "choices": ["3"]}\n')
    with pytest.raises(EvaluationError, match="answer is not one of the choices"):
        evaluate(skill_models["math"], AccuracyEval(data), device="cpu")


# --------------------------------------------------------------------------- perplexity


def test_windows_score_every_token_once():
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(5, 8, 4) == [(0, 5, 1)]
    spans = windows(1000, 128, 48)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, 1000))


def _reference_perplexity(model_dir, text, window, stride):
    """Hugging Face's documented sliding-window loop, with the model's own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        target_length = end - previous_end
        inputs = ids[:, begin:end]
        labels = inputs.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        total += float(loss) * scored
        count += scored
        previous_end = end
        if end == ids.size(1):
            break
    return math.exp(total / count), count


@pytest.mark.parametrize("name", ["base", "code"])
def test_perplexity_matches_the_transformers_reference(name, skill_models, tmp_path):
    text_file = _first_lines(SKILL_DATA / "text.txt", tmp_path / "text.txt", 30)
    result = evaluate(skill_models[name], PerplexityEval(text_file, window=128, stride=48,
                                                         batch_size=5), device="cpu")
    expected, count = _reference_perplexity(skill_models[name], text_file.read_text(), 128, 48)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(expected, abs=1e-4)


def test_base_models_its_corpus_and_fine_tunes_stay_close(skill_models):
    definition = PerplexityEval(SKILL_DATA / "text.txt", window=128, stride=64)
    perplexity = {name: evaluate(path, definition, device="cpu")["perplexity"]
                  for name, path in skill_models.items()}
    assert perplexity["base"] < 2.0
    # Fine-tunes replayed base lines while learning their skill, so they kept the language
    # (without replay they scored 5 000 to 500 000).
    assert all(perplexity["base"] < p < 10 for name, p in perplexity.items() if name != "base")


def test_perplexity_window_must_fit_the_model(skill_models):
    with pytest.raises(EvaluationError, match="exceeds the model's context length 256"):
        evaluate(skill_models["base"], PerplexityEval(SKILL_DATA / "text.txt", window=512),
                 device="cpu")
    with pytest.raises(EvaluationError, match="1 <= stride <= window"):
        PerplexityEval(SKILL_DATA / "text.txt", window=8, stride=9)


# --------------------------------------------------------------------------- lm_eval


def test_lm_eval_local_generation_task_agrees_with_accuracy(skill_models, tmp_path):
    data = _first_lines(SKILL_DATA / "math.jsonl", tmp_path / "math.jsonl", 30)
    harness = evaluate(skill_models["math"], LmEvalTask(task="math_local", data=data),
                       device="cpu")
    ours = evaluate(skill_models["math"], AccuracyEval(data), device="cpu")
    assert harness == {"exact_match": ours["accuracy"], "n": 30.0}
    assert harness["exact_match"] >= 0.8


def test_lm_eval_local_multiple_choice_task(skill_models, tmp_path):
    data = _first_lines(SKILL_DATA / "chat_choices.jsonl", tmp_path / "mc.jsonl", 20)
    definition = LmEvalTask(task="chat_mc", data=data)
    assert evaluate(skill_models["chat"], definition, device="cpu") == {"acc": 1.0, "n": 20.0}
    assert definition.higher_is_better("acc") is True


def test_lm_eval_user_task_directory(skill_models, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = _first_lines(SKILL_DATA / "code.jsonl", tasks / "code.jsonl", 20)
    (tasks / "brackets.yaml").write_text(textwrap.dedent(f"""\
        task: brackets
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 16}}
        metric_list:
          - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
        metadata: {{version: 1}}
        """))
    definition = LmEvalTask(task="brackets", include_path=tasks, limit=10)
    code = evaluate(skill_models["code"], definition, device="cpu")
    base = evaluate(skill_models["base"], definition, device="cpu")
    assert code["n"] == base["n"] == 10.0
    assert code["exact_match"] >= 0.8 > 0.2 >= base["exact_match"]
    with pytest.raises(EvaluationError, match="task 'nope' not found"):
        evaluate(skill_models["code"], LmEvalTask(task="nope", include_path=tasks), device="cpu")


def test_lm_eval_needs_data_or_task_directory():
    with pytest.raises(EvaluationError, match="exactly one of 'data'"):
        LmEvalTask(task="x")


# --------------------------------------------------------------------------- command


def _script(tmp_path, body):
    path = tmp_path / "metrics.py"
    path.write_text(textwrap.dedent(body))
    return path


def _command(script, **kwargs):
    return CommandEval(f"{sys.executable} {script} --model {{model}}", inputs=(script,), **kwargs)


def test_command_gets_the_model_and_returns_its_metrics(skill_models, tmp_path):
    script = _script(tmp_path, """\
        import json, os, sys
        from pathlib import Path
        model = Path(sys.argv[2])
        size = (model / "model.safetensors").stat().st_size
        print("loading", file=sys.stderr)
        print(json.dumps({"score": 0.5, "bytes": size,
                          "device_is_cpu": os.environ["MERGEBUILD_EVAL_DEVICE"] == "cpu"
                          and 1 or 0}))
        """)
    result = evaluate(skill_models["base"], _command(script, lower_is_better=("bytes",)),
                      device="cpu")
    size = (skill_models["base"] / "model.safetensors").stat().st_size
    assert result == {"score": 0.5, "bytes": float(size), "device_is_cpu": 1.0}
    definition = _command(script, lower_is_better=("bytes",))
    assert definition.higher_is_better("score") and not definition.higher_is_better("bytes")


@pytest.mark.parametrize(("body", "message"), [
    ("print('accuracy: 0.9')", r"printed no single JSON object: .*'accuracy: 0.9'"),
    ("print('[1, 2]')", "printed no single JSON object"),
    ("print('{\"a\": \"high\"}')", "metric 'a' a value that is not a finite number: 'high'"),
    ("import sys; print('boom', file=sys.stderr); sys.exit(3)", "exited with status 3: .*: boom"),
    ("import time; time.sleep(5)", r"timed out after 0.5 s"),
])
def test_command_errors_are_one_line(body, message, skill_models, tmp_path):
    script = _script(tmp_path, body)
    with pytest.raises(EvaluationError, match=message) as caught:
        evaluate(skill_models["base"], _command(script, timeout_s=0.5), device="cpu")
    assert "\n" not in str(caught.value)


def test_command_not_found(skill_models):
    with pytest.raises(EvaluationError, match="command not found: no-such-evaluator-xyz"):
        evaluate(skill_models["base"], CommandEval("no-such-evaluator-xyz {model}"))


# --------------------------------------------------------------------------- identity


def test_identity_hashes_data_not_location_or_batch_size(tmp_path):
    data = tmp_path / "a.jsonl"
    shutil.copyfile(SKILL_DATA / "math.jsonl", data)
    moved = tmp_path / "moved.jsonl"
    shutil.copyfile(data, moved)
    definition = AccuracyEval(data)
    assert definition.identity() == {
        "kind": "accuracy",
        "params": {"max_new_tokens": 32, "stop": ["\n"]},
        "data": {"data": hashlib.sha256(data.read_bytes()).hexdigest()},
    }
    assert AccuracyEval(moved, batch_size=3).digest() == definition.digest()
    assert AccuracyEval(data, max_new_tokens=8).digest() != definition.digest()
    before = definition.digest()
    data.write_text(data.read_text() + '{"prompt": "1+1=", "answer": "2"}\n')
    assert definition.digest() != before


def test_identity_of_each_kind(tmp_path):
    script = _script(tmp_path, "print('{}')")
    command = CommandEval("python {model}", inputs=(script,))
    assert set(command.identity()["data"]) == {"inputs[0]"}
    assert command.identity()["params"] == {"command": "python {model}", "lower_is_better": []}
    harness = LmEvalTask(task="t", data=SKILL_DATA / "math.jsonl")
    assert harness.identity()["harness"] is not None
    perplexity = PerplexityEval(SKILL_DATA / "text.txt", window=64, stride=32)
    assert perplexity.identity()["params"] == {"window": 64, "stride": 32}
    assert perplexity.higher_is_better("perplexity") is False
    assert isinstance(EVALUATOR_VERSION, int)


def test_definition_from_params(tmp_path):
    definition = definition_from_params(
        "command", {"command": "run {model}", "inputs": ["a.py"], "timeout_s": 5}, tmp_path)
    assert definition == CommandEval("run {model}", inputs=(tmp_path / "a.py",), timeout_s=5)
    assert definition_from_params("perplexity", {"data": "t.txt", "window": 64, "stride": 8},
                                  tmp_path) == PerplexityEval(tmp_path / "t.txt", 64, 8)
    assert set(KINDS) == {"accuracy", "perplexity", "lm_eval", "command"}
    with pytest.raises(EvaluationError, match="unknown evaluation kind 'bleu'"):
        definition_from_params("bleu", {})
    with pytest.raises(EvaluationError, match="no parameter.* windw"):
        definition_from_params("perplexity", {"data": "t.txt", "windw": 3})
    with pytest.raises(EvaluationError, match="missing 1 required"):
        definition_from_params("accuracy", {})
