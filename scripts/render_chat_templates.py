#!/usr/bin/env python3
"""Render the chat-template fixtures with HF transformers' own renderer.

For every template in tests/fixtures/chat_templates/*.jinja and every conversation below, calls
`transformers.utils.chat_template_utils.render_jinja_template` (what
`tokenizer.apply_chat_template(..., tokenize=False)` calls: jinja2's sandboxed environment with
trim_blocks / lstrip_blocks, HF's `tojson` and `raise_exception`) and writes the results to
tests/fixtures/chat_templates/expected.json, which crates/mamba2/tests/chat_template_hf.rs
compares the Rust renderer against.

    python3 scripts/render_chat_templates.py      # transformers 5.x, jinja2 >= 3.1.6

Deterministic: rerunning with the same versions leaves git clean.
"""
import json
import pathlib

import jinja2
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = ROOT / "tests" / "fixtures" / "chat_templates"

# Special tokens of each model family, as their tokenizer_config.json names them.
SPECIAL = {
    "granite-4.0": {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"},
    "nemotron-nano-v2": {"bos_token": "<SPECIAL_1>", "eos_token": "<SPECIAL_12>"},
    "nemotron-3-nano": {"bos_token": "<s>", "eos_token": "<|im_end|>"},
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Bath\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CALL = {
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Bath", "unit": "celsius"}},
}

CASES = [
    {"name": "user_only", "messages": [{"role": "user", "content": "Hello!"}],
     "add_generation_prompt": True},
    {"name": "user_only_no_prompt", "messages": [{"role": "user", "content": "Hello!"}],
     "add_generation_prompt": False},
    {"name": "system_user", "add_generation_prompt": True, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a state space model?"}]},
    {"name": "multi_turn", "add_generation_prompt": True, "messages": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Who wrote Emma?"},
        {"role": "assistant", "content": "Jane Austen wrote Emma."},
        {"role": "user", "content": "  And Persuasion?  "}]},
    {"name": "multi_turn_ends_with_assistant", "add_generation_prompt": False, "messages": [
        {"role": "user", "content": "Who wrote Emma?"},
        {"role": "assistant", "content": "Jane Austen."},
        {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "In 1815."}]},
    {"name": "unicode_and_markup", "add_generation_prompt": True, "messages": [
        {"role": "user", "content": "Translate «naïve café» — 日本語 😀 <b>bold</b> & \"quotes\"\nnew line\ttab"}]},
    {"name": "tools", "add_generation_prompt": True, "tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "You help with the weather."},
        {"role": "user", "content": "Weather in Bath?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 14, \"sky\": \"rain\"}"},
        {"role": "user", "content": "Thanks. /no_think"}]},
    {"name": "tools_no_system", "add_generation_prompt": False, "tools": [WEATHER_TOOL],
     "messages": [{"role": "user", "content": "Weather in Bath?"}]},
]

# Cases that only some templates define meaning for.
EXTRA = {
    "granite-4.0": [
        {"name": "documents", "add_generation_prompt": True,
         "documents": [{"doc_id": 1, "title": "Emma", "text": "Emma Woodhouse, handsome, clever, and rich"}],
         "messages": [{"role": "user", "content": "Describe Emma."}]},
        {"name": "content_parts", "add_generation_prompt": True, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be kind."}, {"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
    ],
    "nemotron-nano-v2": [
        {"name": "no_think_system_and_reasoning", "add_generation_prompt": True, "messages": [
            {"role": "system", "content": "You are helpful. /no_think"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>easy</think> 4"},
            {"role": "user", "content": "3+3?"}]},
        {"name": "final_assistant_prefill", "add_generation_prompt": True, "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi"}]},
    ],
    "nemotron-3-nano": [
        {"name": "thinking_off", "add_generation_prompt": True, "extra": {"enable_thinking": False},
         "messages": [{"role": "user", "content": "Hello"}]},
        {"name": "reasoning_history", "add_generation_prompt": True, "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>easy</think>4"},
            {"role": "user", "content": "3+3?"}]},
    ],
}


def main():
    out = {
        "generator": f"transformers {transformers.__version__} render_jinja_template, jinja2 {jinja2.__version__}",
        "cases": [],
    }
    for path in sorted(DIR.glob("*.jinja")):
        name = path.stem
        source = path.read_text()
        for case in CASES + EXTRA.get(name, []):
            kwargs = dict(SPECIAL[name])
            kwargs.update(case.get("extra", {}))
            rendered = render_jinja_template(
                conversations=[case["messages"]],
                tools=case.get("tools"),
                documents=case.get("documents"),
                chat_template=source,
                add_generation_prompt=case["add_generation_prompt"],
                **kwargs,
            )
            rendered = rendered[0] if isinstance(rendered, tuple) else rendered
            if isinstance(rendered, list):
                rendered = rendered[0]
            out["cases"].append({
                "template": path.name,
                "case": case["name"],
                "messages": case["messages"],
                "add_generation_prompt": case["add_generation_prompt"],
                "tools": case.get("tools"),
                "documents": case.get("documents"),
                "extra": case.get("extra", {}),
                "bos_token": SPECIAL[name]["bos_token"],
                "eos_token": SPECIAL[name]["eos_token"],
                "expected": rendered,
            })
    text = json.dumps(out, indent=1, ensure_ascii=False) + "\n"
    target = DIR / "expected.json"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    print(f"{len(out['cases'])} cases -> {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
