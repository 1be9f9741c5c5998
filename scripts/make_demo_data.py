"""Regenerate the demo datasets in data/ deterministically: `python scripts/make_demo_data.py`.

All content is written by this script: small, checkable tasks (arithmetic, facts, formatting rules, tool
choice) so that training on them shows real progress.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data"

COUNTRIES = [  # (country, capital, 国家, 首都)
    ("France", "Paris", "法国", "巴黎"), ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Peru", "Lima", "秘鲁", "利马"), ("Norway", "Oslo", "挪威", "奥斯陆"), ("Greece", "Athens", "希腊", "雅典"),
    ("Poland", "Warsaw", "波兰", "华沙"), ("Chile", "Santiago", "智利", "圣地亚哥"), ("India", "New Delhi", "印度", "新德里"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"), ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Thailand", "Bangkok", "泰国", "曼谷"), ("Vietnam", "Hanoi", "越南", "河内"), ("Cuba", "Havana", "古巴", "哈瓦那"),
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "garden", "window", "silver", "planet", "music", "forest",
         "candle", "bridge", "engine", "pencil", "rocket", "summer", "winter", "island", "mirror"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Berlin", "Madrid", "Hanoi"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "snowy"]


def arithmetic(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    zh = {"+": "加", "-": "减", "*": "乘以"}[op]
    return (f"What is {a} {word} {b}?", f"{a} {op} {b} = {value}. The answer is {value}.",
            f"{a}{zh}{b}等于多少？", f"{a} {op} {b} = {value}，答案是{value}。")


def alpaca_en(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            q, a, _, _ = arithmetic(rng)
            rows.append({"instruction": q, "input": "", "output": a})
        elif kind == 1:
            country, capital, _, _ = rng.choice(COUNTRIES)
            rows.append({"instruction": f"What is the capital of {country}?", "input": "",
                         "output": f"The capital of {country} is {capital}."})
        elif kind == 2:
            word = rng.choice(WORDS)
            rows.append({"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()})
        elif kind == 3:
            nums = rng.sample(range(1, 100), rng.randint(3, 6))
            rows.append({"instruction": "Sort these numbers from smallest to largest.",
                         "input": ", ".join(map(str, nums)), "output": ", ".join(map(str, sorted(nums)))})
        else:
            word = rng.choice(WORDS)
            rows.append({"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]})
    return rows


def alpaca_zh(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            _, _, q, a = arithmetic(rng)
            rows.append({"instruction": q, "input": "", "output": a})
        else:
            _, _, country, capital = rng.choice(COUNTRIES)
            rows.append({"instruction": f"{country}的首都是哪里？", "input": "", "output": f"{country}的首都是{capital}。"})
    return rows


def sharegpt_multiturn(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        number, color = rng.randint(1, 99), rng.choice(COLORS)
        turns = [("human", f"Please remember the number {number} and the color {color}."),
                 ("gpt", f"Noted: the number is {number} and the color is {color}.")]
        asks = [("What number did I give you?", f"You gave me the number {number}."),
                ("Which color did I mention?", f"You mentioned the color {color}."),
                ("What is that number plus one?", f"{number} + 1 = {number + 1}.")]
        for question, answer in rng.sample(asks, rng.randint(1, 3)):
            turns += [("human", question), ("gpt", answer)]
        row = {"conversations": [{"from": r, "value": v} for r, v in turns]}
        if rng.random() < 0.3:
            row["system"] = "You are a careful assistant with a perfect memory."
        rows.append(row)
    return rows


TOOLS = [
    {"name": "get_weather", "description": "Get today's weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                    "required": ["city"]}},
    {"name": "calculator", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}},
]


def sharegpt_tools(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            city, weather = rng.choice(CITIES), rng.choice(WEATHER)
            temp = rng.randint(-5, 35)
            convo = [("human", f"What's the weather like in {city} today?"),
                     ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": city}})),
                     ("observation", json.dumps({"city": city, "weather": weather, "temperature_c": temp})),
                     ("gpt", f"It is {weather} in {city} today, at {temp} degrees Celsius.")]
        elif kind == 1:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            convo = [("human", f"Can you compute {a} * {b} for me?"),
                     ("function_call", json.dumps({"name": "calculator", "arguments": {"expression": f"{a} * {b}"}})),
                     ("observation", json.dumps({"result": a * b})),
                     ("gpt", f"{a} * {b} = {a * b}.")]
        else:
            country, capital, _, _ = rng.choice(COUNTRIES)
            convo = [("human", f"What is the capital of {country}?"),
                     ("gpt", f"The capital of {country} is {capital}. No tool was needed for that.")]
        rows.append({"conversations": [{"from": r, "value": v} for r, v in convo],
                     "tools": json.dumps(TOOLS)})
    return rows


def openai_messages(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        country, capital, _, _ = rng.choice(COUNTRIES)
        rows.append({"messages": [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": f"Name the capital of {country}."},
            {"role": "assistant", "content": f"{capital} is the capital of {country}."}]})
    return rows


def preference(rng: random.Random, n: int) -> list[dict]:
    """Chosen: correct, confident, well-formed. Rejected: wrong, and hedged or sloppy, so a small model can learn
    the preference from both content and form."""
    hedges = ["maybe {x}?", "i think it is {x}", "{x}!!!", "not sure... {x}", "um, {x} probably"]
    rows = []
    for _ in range(n):
        hedge = rng.choice(hedges)
        if rng.random() < 0.5:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10])
            rows.append({"instruction": f"What is {a} plus {b}?", "input": "",
                         "chosen": f"{a} + {b} = {a + b}.", "rejected": hedge.format(x=wrong)})
        else:
            country, capital, _, _ = rng.choice(COUNTRIES)
            other = rng.choice([c for c in COUNTRIES if c[1] != capital])[1]
            rows.append({"instruction": f"What is the capital of {country}?", "input": "",
                         "chosen": f"The capital of {country} is {capital}.", "rejected": hedge.format(x=other)})
    return rows


def feedback(rng: random.Random, n: int) -> list[dict]:
    """Unpaired feedback in LLaMA-Factory's KTO layout (sharegpt messages + a boolean label): the preference
    questions, each with either the good answer (desirable) or the bad one (undesirable), about half each."""
    rows = []
    for pair in preference(rng, n):
        good = rng.random() < 0.5
        rows.append({"messages": [{"role": "user", "content": pair["instruction"]},
                                  {"role": "assistant", "content": pair["chosen"] if good else pair["rejected"]}],
                     "label": good})
    return rows


def corpus(rng: random.Random, n: int) -> list[dict]:
    texts = []
    for _ in range(n):
        kind = rng.randrange(6)
        country, capital, country_zh, capital_zh = rng.choice(COUNTRIES)
        if kind == 0:
            texts.append(f"The capital of {country} is {capital}. {capital} is a city in {country}.")
        elif kind == 1:
            texts.append(f"{country_zh}的首都是{capital_zh}。{capital_zh}是{country_zh}的一个城市。")
        elif kind == 2:
            q, a, q_zh, a_zh = arithmetic(rng)
            texts.append(f"{q} {a} {q_zh}{a_zh}")
        elif kind == 3:
            words = rng.sample(WORDS, 4)
            texts.append(f"The words {', '.join(words)} in capital letters are {', '.join(w.upper() for w in words)}.")
        elif kind == 4:
            nums = rng.sample(range(1, 100), 5)
            texts.append(f"Sorted, the numbers {', '.join(map(str, nums))} become {', '.join(map(str, sorted(nums)))}.")
        else:
            word = rng.choice(WORDS)
            texts.append(f"The word {word} spelled backwards is {word[::-1]}. The color of the sky is blue.")
    return [{"text": t} for t in texts]


REGISTRY = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
    "sharegpt_multiturn_demo": {"file_name": "sharegpt_multiturn_demo.json", "formatting": "sharegpt"},
    "glaive_toolcall_demo": {"file_name": "glaive_toolcall_demo.json", "formatting": "sharegpt",
                             "columns": {"messages": "conversations", "tools": "tools"}},
    "openai_demo": {"file_name": "openai_demo.jsonl", "formatting": "openai",
                    "columns": {"messages": "messages"}},
    "preference_demo": {"file_name": "preference_demo.json", "ranking": True,
                        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                    "rejected": "rejected"}},
    "corpus_demo": {"file_name": "corpus_demo.jsonl", "columns": {"prompt": "text"}},
    "reasoning_demo": {"file_name": "reasoning_demo.jsonl", "formatting": "openai",
                       "columns": {"messages": "messages", "tools": "tools"}},
    "kto_demo": {"file_name": "kto_demo.json", "formatting": "sharegpt",
                 "columns": {"messages": "messages", "kto_tag": "label"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}},
}


def write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "alpaca_en_demo.json", alpaca_en(random.Random(1), 1000))
    write_json(OUT / "alpaca_zh_demo.json", alpaca_zh(random.Random(2), 400))
    write_json(OUT / "sharegpt_multiturn_demo.json", sharegpt_multiturn(random.Random(3), 300))
    write_json(OUT / "glaive_toolcall_demo.json", sharegpt_tools(random.Random(4), 300))
    write_jsonl(OUT / "openai_demo.jsonl", openai_messages(random.Random(5), 100))
    write_json(OUT / "preference_demo.json", preference(random.Random(6), 400))
    write_jsonl(OUT / "corpus_demo.jsonl", corpus(random.Random(7), 4000))
    write_json(OUT / "kto_demo.json", feedback(random.Random(8), 400))
    (OUT / "dataset_info.json").write_text(json.dumps(REGISTRY, indent=2) + "\n", encoding="utf-8")
    print(f"wrote demo datasets to {OUT}")


if __name__ == "__main__":
    main()
