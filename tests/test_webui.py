"""The web UI: forms generated from the config (every key, its type and default), settings -> YAML, command line
and validator messages; and, in a real headless Chromium, a short training run started from the page, its loss
curve, a chat with the result and a screenshot (slow; skipped where Chromium or Gradio is missing)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config
from tunesmith.config.fields import GROUPS
from tunesmith.config.validate import validate_for_train
from tunesmith.webui import forms

ROOT = Path(__file__).resolve().parent.parent


def test_every_config_key_of_every_group_has_a_field_with_its_default():
    made = {(f.group, f.name): f for f in forms.form_fields()}
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            field = made[(group, f.name)]
            default = f.default_factory() if f.default is MISSING else f.default
            assert field.default == default, f.name
            assert field.help == f.metadata["help"]
            if hints[f.name] is bool:
                assert field.kind == "bool"
            if typing.get_origin(hints[f.name]) is typing.Literal:
                assert field.kind == "choice" and field.choices == typing.get_args(hints[f.name])
    assert len(made) == sum(len(fields(c)) for c in GROUPS.values())
    kinds = {f.name: f.kind for f in forms.form_fields()}
    assert kinds["learning_rate"] == "float" and kinds["per_device_train_batch_size"] == "int"
    assert kinds["max_tokens_per_forward"] == "text" and kinds["lr_scheduler_kwargs"] == "mapping"


def test_settings_round_trip_through_yaml_and_the_command_line(tmp_path):
    fields_ = forms.form_fields()
    values = {"model_name_or_path": "models/tiny-llama", "learning_rate": 0.001, "per_device_train_batch_size": 4.0,
              "adapter_name_or_path": "", "lr_scheduler_kwargs": '{"min_lr_rate": 0.1}', "bf16": False,
              "output_dir": "saves/x", "dataset": "alpaca_en_demo", "greater_is_better": ""}
    settings = forms.to_settings(values, fields_)
    assert forms.to_settings({"greater_is_better": "true"}, fields_) == {"greater_is_better": True}
    assert settings == {"model_name_or_path": "models/tiny-llama", "learning_rate": 0.001,
                        "per_device_train_batch_size": 4, "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                        "output_dir": "saves/x", "dataset": "alpaca_en_demo"}  # defaults and empty boxes left out
    path = tmp_path / "c.yaml"
    path.write_text(forms.settings_yaml(settings))
    from_yaml = load_config([str(path)])
    import shlex

    from_cli = load_config(shlex.split(forms.command_line("train", settings))[2:])
    assert from_yaml == from_cli and from_yaml.training.per_device_train_batch_size == 4
    assert yaml.safe_load(forms.settings_yaml(settings)) == settings


def test_problems_are_the_validators_messages():
    assert forms.problems({"learning_rate": "fast"}) and "learning_rate" in forms.problems({"learning_rate": "x"})[0]
    found = forms.problems({"model_name_or_path": "m", "num_train_epochs": 0, "max_steps": -1}, validate_for_train)
    assert any("num_train_epochs" in p for p in found) and any("output_dir" in p for p in found)
    assert forms.problems({"model_name_or_path": "models/tiny-llama", "output_dir": "o", "dataset": "d"},
                          validate_for_train) == []


def test_problems_go_beside_the_fields_they_name():
    found = ["`learning_rate`: expected a number, got 'x'", "`output_dir` is required", "something general"]
    assert forms.problems_by_field(found, ["learning_rate", "output_dir", "seed"]) == {
        "learning_rate": [found[0]], "output_dir": [found[1]]}


def test_webui_without_gradio_names_the_extra(monkeypatch, capsys):
    import builtins

    from tunesmith.cli import main

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "gradio" else real(name, *a, **k))
    assert main(["webui"]) == 2
    assert "pip install 'tunesmith[webui]'" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_browser = pytest.mark.skipif(
    shutil.which("chromedriver") is None or importlib.util.find_spec("gradio") is None
    or importlib.util.find_spec("selenium") is None,
    reason="needs Gradio, Selenium and Debian's chromium + chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,2200", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def _type(driver, elem_id: str, text: str) -> None:
    box = driver.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.clear()
    box.send_keys(text)
    box.send_keys("\t")


def _wait(condition, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the page is still rendering
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@needs_browser
def test_train_watch_and_chat_in_a_browser(tmp_path, browser):
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "webui", f"port={port}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = tmp_path / "run"
    try:
        _wait(lambda: socket.create_connection(("127.0.0.1", port), timeout=1), 120, "the web UI to listen")
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(lambda: browser.find_element("id", "start"), 60, "the page")
        _type(browser, "field-learning_rate", "-1")
        browser.find_element("id", "check").click()
        _wait(lambda: "⚠" in browser.find_element("id", "field-learning_rate").text, 60, "the message beside the field")
        _type(browser, "field-learning_rate", "0.00005")
        _type(browser, "field-output_dir", str(out))
        _type(browser, "field-max_steps", "6")
        _type(browser, "field-logging_steps", "1")
        _type(browser, "field-cutoff_len", "256")
        browser.find_element("id", "check").click()
        _wait(lambda: "max_steps: 6" in browser.find_element("id", "yaml").text, 60, "the YAML")
        assert "tunesmith train" in browser.find_element("css selector", "#command textarea").get_attribute("value")
        browser.find_element("id", "start").click()
        _wait(lambda: "finished" in browser.find_element("id", "status").text, 300, "the run to finish")
        _wait(lambda: browser.find_elements("css selector", "#curve canvas, #curve svg"), 30, "the loss curve")
        assert (out / "adapter_model.safetensors").is_file()
        browser.save_screenshot(str(tmp_path / "webui_train.png"))
        browser.find_element("xpath", "//button[@role='tab' and contains(., 'Chat')]").click()
        _type(browser, "chat-adapter", str(out))
        browser.find_element("id", "chat-load").click()
        status = _wait(lambda: (lambda t: t if t.startswith(("loaded", "could not")) else None)(
            browser.find_element("id", "chat-status").text.strip()), 120, "the model to load")
        assert status.startswith("loaded"), status
        _type(browser, "chat-message", "What is the capital of France?")
        browser.find_element("id", "chat-send").click()
        bubbles = _wait(lambda: (lambda b: b if len(b) >= 2 else None)(
            [x.text.strip() for x in browser.find_elements("css selector", "#chatbot .message") if x.text.strip()]),
            120, "the question and an answer")
        assert bubbles[0] == "What is the capital of France?" and bubbles[1] and "load a model" not in bubbles[1]
        shot = tmp_path / "webui.png"
        browser.save_screenshot(str(shot))
        keep = os.environ.get("TUNESMITH_TEST_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for name in ("webui.png", "webui_train.png"):
                shutil.copy(tmp_path / name, Path(keep) / name)
        assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_job_stops_at_a_checkpoint_and_resumes(tmp_path, monkeypatch, tiny_model_dir):
    """The train tab's Start / Stop / Resume: the CLI in a subprocess, Ctrl-C after the first checkpoint, then the
    saved config reruns from it to the end; the job is found again from its state file."""
    from conftest import sft_rows, write_dataset
    from tunesmith.webui import jobs

    monkeypatch.setattr(jobs, "STATE", tmp_path / "state" / "job.json")
    write_dataset(tmp_path / "data", "sft", sft_rows(40))
    out = tmp_path / "run"
    settings = {"model_name_or_path": str(tiny_model_dir), "dataset_dir": str(tmp_path / "data"), "dataset": "sft",
                "template": "chatml", "output_dir": str(out), "max_steps": 400, "save_steps": 2,
                "per_device_train_batch_size": 1, "logging_steps": 1, "data_cache_dir": str(tmp_path / "cache")}
    job = jobs.start("train", forms.settings_yaml(settings), str(out))
    complete = lambda: [p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]  # noqa: E731
    _wait(complete, 120, "a first checkpoint")
    assert jobs.current().pid == job.pid and job.running()
    job.stop()
    _wait(lambda: not job.running(), 60, "the run to stop")
    assert "interrupted; the latest checkpoint is" in job.log_tail()
    stopped_at = max(int(p.name.split("-")[1]) for p in complete())
    assert stopped_at < 400
    again = jobs.start("train", (out / "tunesmith_config.yaml").read_text(), str(out))
    _wait(lambda: not again.running(), 300, "the resumed run to finish")
    assert f"resuming from checkpoint-{stopped_at}" in again.log_tail(400)
    assert (out / "train_results.json").is_file() and again.history()[-1]["current_steps"] == 400


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="Gradio is not installed")
def test_an_open_host_without_a_key_is_warned_about_and_a_key_is_asked_for(monkeypatch, capsys):
    from tunesmith.webui import app

    launched = {}

    class Page:
        def queue(self):
            return self

        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(app, "build", lambda: Page())
    app.launch("0.0.0.0", 7999, None)
    assert "without api_key" in capsys.readouterr().out and launched["auth"] is None
    app.launch("127.0.0.1", 7999, "secret")
    assert "without api_key" not in capsys.readouterr().out
    assert launched["auth"]("anyone", "secret") and not launched["auth"]("anyone", "guess")
