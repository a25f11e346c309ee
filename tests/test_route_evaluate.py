"""`route` and `evaluate`: the routing they report against the float64 oracle's own choices, and
the scores against unbatched, unpadded greedy decoding and teacher forcing, item by item."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from oracle import lora_deltas, oracle_model
from PIL import Image

import smile_stream
from smile_stream import Options, convert
from smile_stream.errors import SmileError
from smile_stream.evaluate import Item, encode, evaluate, read_tasks
from smile_stream.route import layer_of, route_prompt

ADAPTERS = {"a": dict(r=8, targets="all-linear", seed=51), "b": dict(r=8, targets="all-linear", seed=52)}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smile_stream", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def smile_folder(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("route") / "smile"
    experts = [(n, str(models(f"llama:lora_{n}", **kw))) for n, kw in ADAPTERS.items()]
    convert(str(models("llama")), experts, out, Options(gate_rank=4, top_k=1), quiet=True)
    return out


def _oracle_routing(models, ids: list[int], routing: str, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, layers, experts): the oracle's routing weights, summed over each layer's modules;
    and (tokens, layers): the smallest relative margin of a choice there (near ties may go either
    way in float32)."""
    base = models("llama")
    experts = []
    for name, kw in ADAPTERS.items():
        deltas = lora_deltas(base, models(f"llama:lora_{name}", **kw))
        experts.append({m: (d, None, d.shape[0]) for m, d in deltas.items()})
    model = oracle_model(base, experts, 4, top_k, routing=routing)
    layers = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "OracleSmileLinear":
            module.record = layers.setdefault(name, [])
    tensor = torch.tensor([ids])
    with torch.no_grad():
        model(tensor, attention_mask=torch.ones_like(tensor))
    count = len({layer_of(n) for n in layers})
    out = torch.zeros(len(ids), count, len(ADAPTERS), dtype=torch.float64)
    margins = torch.ones(len(ids), count, dtype=torch.float64)
    for name, record in layers.items():
        for t, (picked, margin) in enumerate(record):
            for expert, weight in picked.items():
                out[t, layer_of(name), expert] += weight
            margins[t, layer_of(name)] = min(margins[t, layer_of(name)], margin)
    return out, margins


@pytest.mark.parametrize("routing", ["module", "token", "sequence"])
def test_route_reports_the_oracles_choices(models, smile_folder, routing):
    # The prompt in one forward, then four greedy tokens decoded one by one (the one-token path):
    # every token's per-layer routing must be the oracle's over the whole sequence in one pass.
    model = smile_stream.load_model(smile_folder, routing=routing)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smile_folder)
    ids = encode(tokenizer, "route these tokens", chat=False)[0]
    result = route_prompt(model, tokenizer, ids, new_tokens=4)
    assert result.prompt_tokens == len(ids) and len(result.tokens) == len(ids) + 3
    generated = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)[0].tolist()
    sequence = generated[:-1]
    expected, margins = _oracle_routing(models, sequence, routing)
    clear = margins > 1e-4  # cells where no module's choice was a near tie (float32 may break it either way)
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(result.weights.double()[clear], expected[clear], rtol=1e-5, atol=1e-5)
    assert sum(result.shares()) == pytest.approx(1.0)


def test_route_command_terminal_png_json(smile_folder, tmp_path):
    png, out = tmp_path / "r.png", tmp_path / "r.json"
    run = _cli(
        "route",
        str(smile_folder),
        "hello",
        "--generate",
        "2",
        "--routing",
        "module",
        "--routing",
        "sequence",
        "--png",
        str(png),
        "--json",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert "routing: module" in run.stdout and "routing: sequence" in run.stdout and "share: a " in run.stdout
    data = json.loads(out.read_text())
    assert [d["routing"] for d in data] == ["module", "sequence"] and len(data[0]["tokens"]) == 5 + 1
    assert all(len(t["experts"]) == len(data[0]["layers"]) for t in data[0]["tokens"])
    image = Image.open(png).convert("RGB")
    assert image.size[0] > 300 and image.size[1] > 200
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 10, "a picture, not a blank canvas"
    run = _cli("route", str(smile_folder))
    assert run.returncode == 2 and "No prompt" in run.stderr and "Traceback" not in run.stderr


def _greedy_alone(model, tokenizer, prompt: str, new: int, clear: bool = False) -> str | None:
    """The greedy answer to one prompt, unbatched; with `clear`, None when some step's best token led
    the next by under 1e-3 in logits (batched decoding rounds differently and may pick the other)."""
    ids = torch.tensor([encode(tokenizer, prompt, chat=False)[0]])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    if clear and any(float(step[0].topk(2).values.diff().abs()) < 1e-3 for step in out.scores):
        return None
    return tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)


def _tasks(model, tokenizer, new: int) -> tuple[list[Item], dict[str, float]]:
    """Items whose answers are the model's own unbatched greedy output (right) or not (wrong):
    task "a" all right, task "b" half right, task "other" all wrong. Prompts of different lengths
    (so batches are left-padded) among those this random model answers with visible text."""
    expected = {"a": 1.0, "b": 0.5, "other": 0.0}
    wanted = {"a": 3, "b": 4, "other": 2}
    answered = []
    for i in range(200):
        prompt = f"q{i} " + "w" * (i % 7)
        right = _greedy_alone(model, tokenizer, prompt, new, clear=True)
        if right and right.strip():
            answered.append((prompt, right))
        if len(answered) == sum(wanted.values()):
            break
    assert len(answered) == sum(wanted.values()), "the test needs prompts with visible answers"
    items = []
    for task, count in wanted.items():
        for j in range(count):
            prompt, right = answered.pop(0)
            good = expected[task] == 1.0 or (expected[task] == 0.5 and j % 2 == 0)
            items.append(Item(task, prompt, right if good else "no such answer"))
    return items, expected


@pytest.mark.parametrize("mixed", [False, True])
def test_evaluate_matches_item_by_item_decoding(smile_folder, mixed):
    model = smile_stream.load_model(smile_folder, routing="sequence")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smile_folder)
    items, expected = _tasks(model, tokenizer, 5)
    results = evaluate(model, tokenizer, items, chat=False, mixed=mixed, batch=4, max_new_tokens=5)
    assert {task: r["accuracy"] for task, r in results.items()} == expected
    for task in expected:  # the answer NLL: each item alone, unpadded, teacher-forced
        nlls = []
        for item in (i for i in items if i.task == task):
            ids, prompt_len = encode(tokenizer, item.prompt, item.answer, chat=False)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            targets = torch.tensor(ids[prompt_len:])
            nlls.append(float(-torch.log_softmax(logits[prompt_len - 1 : -1], -1).gather(1, targets[:, None]).mean()))
        assert results[task]["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-4, abs=1e-4)
    assert 0.0 <= results["a"]["routing"] <= 1.0 and "routing" not in results["other"]  # "other" names no expert


def test_evaluate_routing_share_is_the_oracles(models, smile_folder):
    # One item per task named after an expert: the share of its answer tokens' routing (all
    # modules) that went to that expert, against the oracle over the unpadded sequence.
    model = smile_stream.load_model(smile_folder, routing="sequence")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smile_folder)
    items = [Item("a", "first prompt here", "some answer"), Item("b", "p2", "another answer, longer")]
    results = evaluate(model, tokenizer, items, chat=False, batch=2, max_new_tokens=2)
    for expert, item in enumerate(items):
        ids, prompt_len = encode(tokenizer, item.prompt, item.answer, chat=False)
        routed = _oracle_routing(models, ids, "sequence")[0][prompt_len:].sum((0, 1))
        assert results[item.task]["routing"] == pytest.approx(float(routed[expert] / routed.sum()), abs=1e-6)


def test_evaluate_command_with_the_experts(models, smile_folder, tmp_path):
    model = smile_stream.load_model(smile_folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smile_folder)
    items, _ = _tasks(model, tokenizer, 4)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task": i.task, "prompt": i.prompt, "answer": i.answer}) + "\n" for i in items))
    out, png = tmp_path / "scores.json", tmp_path / "scores.png"
    run = _cli(
        "evaluate",
        str(smile_folder),
        "--tasks",
        str(tasks),
        "--experts",
        "--mixed",
        "--max-new-tokens",
        "4",
        "--json",
        str(out),
        "--png",
        str(png),
        "--batch-size",
        "3",
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert list(results) == ["smile", "base", "a", "b"] and "| task |" in run.stdout
    base = transformers.AutoModelForCausalLM.from_pretrained(str(models("llama")))
    for task in ("a", "b", "other"):  # the base, item by item
        mine = [i for i in items if i.task == task]
        hits = [_greedy_alone(base, tokenizer, i.prompt, 4).strip() == i.answer.strip() for i in mine]
        assert results["base"][task]["accuracy"] == pytest.approx(sum(hits) / len(hits))
    image = Image.open(png).convert("L")
    assert image.size[0] > 300 and image.getextrema()[0] < 128


def test_bad_task_files(tmp_path):
    cases = {
        "is not JSON": "{oops\n",
        "'answer' must be": '{"task": "t", "prompt": "p", "answer": 5}\n',
        "unknown keys": '{"task": "t", "prompt": "p", "answer": "a", "extra": 1}\n',
        "holds no tasks": "\n\n",
        "expected a JSON object": "[1, 2]\n",
    }
    for message, text in cases.items():
        path = tmp_path / "t.jsonl"
        path.write_text(text)
        with pytest.raises(SmileError, match=message):
            read_tasks(path)


def test_evaluate_experts_that_moved(smile_folder, tmp_path):
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(smile_folder, moved)
    config = json.loads((moved / "config.json").read_text())
    config["smile"]["experts"][0]["source"] = str(tmp_path / "gone" / "adapter")
    (moved / "config.json").write_text(json.dumps(config))
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"task": "a", "prompt": "p", "answer": "x"}\n')
    run = _cli("evaluate", str(moved), "--tasks", str(tasks), "--experts", "--max-new-tokens", "1")
    assert run.returncode == 2 and "--source a=PATH" in run.stderr and "Traceback" not in run.stderr, run.stderr
