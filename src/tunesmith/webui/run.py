"""`tunesmith webui [host=127.0.0.1] [port=7860] [api_key=...]`."""

from __future__ import annotations

import os
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import StopError

SERVE_DEFAULT_PORT = 8000  # `port` is shared with `tunesmith serve`; left at serve's default, the web UI takes 7860
WEBUI_PORT = 7860


def run(cfg: Config, extras: dict[str, Any]) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page reports nothing to anyone
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise StopError("the web UI needs Gradio: pip install 'tunesmith[webui]'", exit_code=2) from None
    from tunesmith.webui.app import launch

    port = WEBUI_PORT if cfg.serve.port == SERVE_DEFAULT_PORT else cfg.serve.port
    launch(cfg.serve.host, port, cfg.serve.api_key or os.environ.get("API_KEY"))
    return 0
