"""Runs the web UI starts: each is the CLI itself (`python -m tunesmith.cli <command> <yaml>`) in a subprocess,
never a second implementation. The job is remembered in a small state file, so a page reload, a second browser
or a restarted web UI finds the running (or last) job; its output is read back from the files the command
writes (trainer_log.jsonl, its log), not from the browser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE = Path(os.path.expanduser("~/.cache/tunesmith/webui/job.json"))


@dataclass
class Job:
    command: str
    config: str        # the YAML file it runs
    output_dir: str    # where its logs go
    log: str           # its stdout + stderr
    pid: int
    started: float

    def running(self) -> bool:
        try:
            waited, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (a restarted web UI): ask the OS
            try:
                os.kill(self.pid, 0)
            except OSError:
                return False
            return True
        return waited == 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = Path(self.log).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def history(self) -> list[dict[str, Any]]:
        path = Path(self.output_dir) / "trainer_log.jsonl"
        out = []
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        except OSError:
            pass
        return out

    def stop(self) -> None:
        """Ctrl-C for the run: tunesmith stops with its latest checkpoint and says how to resume."""
        if self.running():
            os.kill(self.pid, signal.SIGINT)


def start(command: str, config_yaml: str, output_dir: str, folder: Path | None = None) -> Job:
    """Write the YAML beside the run's output and start the command on it."""
    folder = folder or Path(output_dir).with_name(Path(output_dir).name + ".webui")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{command}.yaml"
    config.write_text(config_yaml, encoding="utf-8")
    log = folder / f"{command}.log"
    handle = open(log, "w", encoding="utf-8")  # noqa: SIM115 - owned by the child from here on
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", command, str(config), "disable_tqdm=true"],
                            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle.close()
    job = Job(command, str(config), output_dir, str(log), proc.pid, time.time())
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(asdict(job)), encoding="utf-8")
    return job


def current() -> Job | None:
    try:
        return Job(**json.loads(STATE.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
