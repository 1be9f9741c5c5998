"""`tunesmith serve cfg.yaml [host=... port=...]`: load the model once and serve the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, raise_if


def run(cfg: Config, extras: dict[str, Any]) -> int:
    raise_if(check_model(cfg) + check_finetuning(cfg))
    if cfg.model.infer_backend == "vllm":
        from tunesmith.infer.vllm import import_vllm

        import_vllm()  # a clear error where vLLM is missing
        raise_if(["`serve` with `infer_backend: vllm`: use vLLM's own OpenAI server on the exported model "
                  "(`tunesmith export`, then `vllm serve EXPORT_DIR`); tunesmith's server uses the hf backend"])
    try:
        import uvicorn
    except ImportError:
        raise_if(["`tunesmith serve` needs fastapi and uvicorn: pip install 'tunesmith[serve]'"])
    from tunesmith.infer.chat_engine import ChatEngine
    from tunesmith.serve.app import create_app

    app = create_app(ChatEngine(cfg), cfg)
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port}/v1 (Ctrl-C stops)")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    return 0
