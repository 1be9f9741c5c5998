"""The web UI's chat, evaluate/predict and export tabs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from tunesmith.webui import forms


class ChatSession:
    """One loaded model (the chat engine of `tunesmith chat`), shared by the page's visitors."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.cfg: Any = None
        self.lock = threading.Lock()

    def load(self, model: str, adapter: str, template: str) -> str:
        from tunesmith.config import ConfigError, load_config
        from tunesmith.infer.chat_engine import make_chat_engine

        args = [f"model_name_or_path={model.strip()}", f"template={template.strip() or 'auto'}"]
        if adapter.strip():
            args.append(f"adapter_name_or_path={adapter.strip()}")
        try:
            cfg = load_config(args)
            with self.lock:
                self.engine, self.cfg = make_chat_engine(cfg), cfg
        except (ConfigError, OSError, ValueError) as err:
            return f"**could not load:** {err}"
        return f"**loaded** {model}" + (f" + {adapter}" if adapter.strip() else "")

    def reply(self, message: str, history: list) -> Iterator[tuple[list, str]]:
        from tunesmith.data.conversation import Conversation, Message

        if self.engine is None:
            yield history + [{"role": "assistant", "content": "(load a model first)"}], ""
            return
        if not message.strip():
            yield history, ""
            return
        conv = Conversation(system=self.cfg.model.default_system)
        for turn in history:
            conv.messages.append(Message(turn["role"], str(turn["content"])))
        conv.messages.append(Message("user", message))
        history = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        with self.lock:
            prompt = self.engine.prompt_ids(conv)
            for piece in self.engine.stream(prompt, self.cfg.generation):
                history[-1]["content"] += piece
                yield history, ""
        yield history, ""


def run_command(command: str, settings: dict[str, Any], flags: tuple[str, ...] = (), timeout: int = 3600) -> str:
    """A CLI command (with command-line `flags` such as --verify) to the end, in a subprocess; its output."""
    args = [*forms.command_args(settings), *flags]
    run = subprocess.run([sys.executable, "-m", "tunesmith.cli", command, *args], capture_output=True, text=True,
                         timeout=timeout)
    shown = " ".join([forms.command_line(command, settings), *flags])
    return f"$ {shown}\n(exit {run.returncode})\n{(run.stdout + run.stderr)[-8000:]}"


def _model_row() -> tuple[Any, Any]:
    with gr.Row():
        model = gr.Textbox(label="model_name_or_path", value="models/tiny-llama")
        adapter = gr.Textbox(label="adapter_name_or_path (empty: none)")
    return model, adapter


def _common(model: str, adapter: str) -> dict[str, Any]:
    return {"model_name_or_path": model.strip(), **({"adapter_name_or_path": adapter.strip()} if adapter.strip() else {})}


def run_tab() -> None:
    with gr.Tab("Evaluate & predict"):
        model, adapter = _model_row()
        with gr.Row():
            task = gr.Textbox(label="task (mmlu_demo, ceval_demo, or a task folder)", value="mmlu_demo")
            n_shot = gr.Number(label="n_shot", value=5, precision=0)
            split = gr.Dropdown(["validation", "test", "dev"], value="validation", label="split")
            eval_btn = gr.Button("Evaluate", elem_id="eval")
        with gr.Row():
            dataset = gr.Textbox(label="predict: dataset (from data/dataset_info.json)", value="alpaca_en_demo")
            max_samples = gr.Number(label="max_samples", value=20, precision=0)
            out_dir = gr.Textbox(label="output_dir", value="saves/webui/predict")
            predict_btn = gr.Button("Predict", elem_id="predict")
        output = gr.Textbox(label="output", lines=16, elem_id="run-output")
        results = gr.JSON(label="results")

        def evaluate(m: str, a: str, t: str, n: float, s: str) -> tuple[str, Any]:
            save = Path("saves/webui/eval")
            text = run_command("eval", {**_common(m, a), "task": t, "n_shot": int(n), "split": s,
                                        "save_dir": str(save), "template": "auto"})
            return text, _read_json(save / "results.json")

        def predict(m: str, a: str, d: str, n: float, o: str) -> tuple[str, Any]:
            text = run_command("predict", {**_common(m, a), "dataset": d, "max_samples": int(n), "output_dir": o,
                                           "predict_with_generate": True, "max_new_tokens": 64})
            return text, _read_json(Path(o) / "predict_results.json")

        eval_btn.click(evaluate, [model, adapter, task, n_shot, split], [output, results])
        predict_btn.click(predict, [model, adapter, dataset, max_samples, out_dir], [output, results])


def export_tab() -> None:
    with gr.Tab("Export"):
        model, adapter = _model_row()
        with gr.Row():
            export_dir = gr.Textbox(label="export_dir", value="exports/webui")
            fmt = gr.Dropdown(["safetensors", "gguf"], value="safetensors", label="export_format")
            gguf_type = gr.Dropdown(["f32", "f16", "bf16", "q8_0"], value="f16", label="gguf_type")
            dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="export_dtype")
            size = gr.Number(label="export_size (GB per shard)", value=5.0)
        with gr.Row():
            legacy = gr.Checkbox(label="export_legacy_format (.bin pickles)", value=False)
            verify = gr.Checkbox(label="verify", value=True)
            force = gr.Checkbox(label="replace a non-empty export_dir", value=False)
            export_btn = gr.Button("Export", variant="primary", elem_id="export")
        output = gr.Textbox(label="output", lines=12, elem_id="export-output")

        def export(m: str, a: str, d: str, f: str, g: str, t: str, s: float, leg: bool, v: bool, fo: bool) -> str:
            settings = {**_common(m, a), "export_dir": d, "export_format": f, "export_dtype": t,
                        "export_size": s, "export_legacy_format": leg}
            if f == "gguf":
                settings["gguf_type"] = g
            return run_command("export", settings, ("--verify",) * v + ("--force",) * fo)

        export_btn.click(export, [model, adapter, export_dir, fmt, gguf_type, dtype, size, legacy, verify, force],
                         output)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
