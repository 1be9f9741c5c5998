"""`tunesmith serve cfg.yaml [host=... port=...]`: load the model once and serve the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, raise_if


def run(cfg: Config, extras: dict[str, Any]) -> int:
    raise_if(check_model(cfg) + check_finetuning(cfg))
    try:
        import uvicorn
    except ImportError:
        raise_if(["`tunesmith serve` needs fastapi and uvicorn: pip install 'tunesmith[serve]'"])
    from tunesmith.infer.chat_engine import make_chat_engine
    from tunesmith.serve.app import create_app

    app = create_app(make_chat_engine(cfg), cfg)
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port}/v1 (Ctrl-C stops)")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    return 0
