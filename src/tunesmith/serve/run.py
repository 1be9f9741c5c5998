"""`tunesmith serve cfg.yaml [host=... port=...]`: load the model once and serve the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, check_serve, raise_if

GRACE_S = 5  # after SIGTERM / Ctrl-C: how long open connections may take to finish their last bytes


def run(cfg: Config, extras: dict[str, Any]) -> int:
    raise_if(check_model(cfg) + check_finetuning(cfg) + check_serve(cfg))
    try:
        import uvicorn
    except ImportError:
        raise_if(["`tunesmith serve` needs fastapi and uvicorn: pip install 'tunesmith[serve]'"])
    from tunesmith.infer.chat_engine import make_chat_engine
    from tunesmith.serve.app import create_app

    engine = make_chat_engine(cfg)
    server = make_server(create_app(engine, cfg), cfg, engine)
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port}/v1 (Ctrl-C stops)", flush=True)
    server.run()
    return 0


def make_server(app: Any, cfg: Config, engine: Any) -> Any:
    """A uvicorn server whose SIGTERM / Ctrl-C also ends every running generation, so it stops at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.shutdown.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
                            timeout_graceful_shutdown=GRACE_S)
    return Server(config)
