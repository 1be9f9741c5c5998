"""`tunesmith <command> [config.yaml] [key=value ...] [--key value ...]`.

Imports stay lazy so `tunesmith --help` answers instantly; each command lives in its own module with a
`run(cfg, extras)` function.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

USAGE = """usage: tunesmith <command> [config.yaml] [key=value ...] [--key value ...]

commands:
  train     fine-tune a model (stages {stages}) with lora, freeze or full tuning
  predict   generate over a dataset with the training template; BLEU / ROUGE / exact match
  eval      multiple-choice benchmarks: MMLU, C-Eval, CMMLU layouts, n-shot
  chat      talk to a model in the terminal
  serve     OpenAI-compatible API server
  export    merge LoRA adapters into the base model; write safetensors shards (or legacy .bin) or GGUF
  data      load, validate and tokenize the configured datasets and show what the model will see
  webui     the same from a browser: configure, run, watch, chat, evaluate, export (tunesmith[webui])
  version   print the version

Run `tunesmith <command> --help` for every setting the command accepts.
"""


def usage() -> str:
    from tunesmith.stages import NAMES

    return USAGE.format(stages=", ".join(NAMES))


@dataclass
class Command:
    module: str
    groups: list[str]
    summary: str
    # Command-line-only switches that are not config fields: name -> takes a value?
    extras: dict[str, bool] = field(default_factory=dict)


COMMANDS: dict[str, Command] = {
    "train": Command("tunesmith.train.recipe", ["model", "data", "finetuning", "training", "generation", "logging"],
                     "Fine-tune a model."),
    "predict": Command("tunesmith.predict.run", ["model", "data", "finetuning", "training", "generation", "logging"],
                       "Generate over a dataset; write generated_predictions.jsonl and BLEU/ROUGE scores."),
    "eval": Command("tunesmith.evaluate.run", ["model", "finetuning", "eval", "training", "logging"],
                    "Multiple-choice benchmarks (MMLU, C-Eval, CMMLU layouts), n-shot, with prefix KV reuse."),
    "chat": Command("tunesmith.chat", ["model", "finetuning", "generation", "logging"],
                    "Talk to a model in the terminal (streaming; `clear`, `exit`; Ctrl-C stops an answer)."),
    "serve": Command("tunesmith.serve.run", ["model", "finetuning", "generation", "serve", "logging"],
                     "An OpenAI-compatible API: /v1/models, /v1/chat/completions (streaming, tools), /health."),
    "export": Command("tunesmith.export", ["model", "finetuning", "export", "logging"],
                      "Merge adapters into the base model and write a standard Hugging Face model folder or GGUF.",
                      {"verify": False, "force": False}),
    "data": Command("tunesmith.preview", ["model", "data", "finetuning", "logging"],
                    "Load, validate and tokenize datasets; print a summary and one rendered example.",
                    {"dump": True}),
    "webui": Command("tunesmith.webui.run", ["serve", "logging"],
                     "A web UI over these commands (Gradio): host and port (default 127.0.0.1:7860), api_key."),
}


def split_extras(argv: list[str], extras: dict[str, bool]) -> tuple[list[str], dict[str, str | bool]]:
    rest, found = [], {}
    i = 0
    while i < len(argv):
        name = argv[i][2:].split("=", 1)[0] if argv[i].startswith("--") else None
        if name in extras:
            if "=" in argv[i]:
                found[name] = argv[i].split("=", 1)[1]
            elif extras[name]:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: --{name} needs a value")
                found[name] = argv[i + 1]
                i += 1
            else:
                found[name] = True
        else:
            rest.append(argv[i])
        i += 1
    return rest, found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("version", "--version", "-V"):
        from tunesmith import __version__

        print(f"tunesmith {__version__}")
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command `{name}`\n\n{usage()}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if "-h" in rest or "--help" in rest:
        from tunesmith.config.help import group_help

        extras = "".join(f"\n  --{e}{' VALUE' if v else ''}" for e, v in command.extras.items())
        print(f"usage: tunesmith {name} [config.yaml] [key=value ...] [--key value ...]\n\n{command.summary}"
              + (f"\n\ncommand options:{extras}" if extras else "") + group_help(command.groups))
        return 0
    from tunesmith.config import ConfigError, load_config
    from tunesmith.data.errors import DataError
    from tunesmith.errors import StopError

    try:
        rest, extras = split_extras(rest, command.extras)
        cfg = load_config(rest)
        from tunesmith.config.preflight import preflight
        from tunesmith.runtime import prepare_process

        preflight(name, cfg)  # every check that needs no model, before torch is imported
        prepare_process(cfg)
        if getattr(cfg, "ignored_keys", None):
            import logging

            logging.getLogger("tunesmith").info("accepted without effect (they change nothing in tunesmith): %s",
                                                ", ".join(cfg.ignored_keys))
        module = importlib.import_module(command.module)
        return int(module.run(cfg, extras) or 0)
    except ConfigError as err:
        print(f"error: the config has {len(err.problems)} problem(s):", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StopError as err:
        print(f"error: {err}" if err.exit_code != 130 else str(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
