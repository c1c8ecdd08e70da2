"""A local model folder without a working tokenizer is refused on the login node, in one line,
before anything is submitted; so is `prompt.chat_template_kwargs` for a model with no chat
template (the arguments would be ignored). Hub IDs are left to `distill.hub`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.preflight import check_inputs, check_tokenizers
from jobs.driver import Driver
from jobs.driver import main as driver_main
from tests.conftest import run_python
from tests.test_driver import snapshot

WEIGHTS_ONLY = ("config.json", "generation_config.json", "model.safetensors")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test starts with no tokenizer remembered as checked."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _copy(model: Path, dest: Path, names: tuple[str, ...] | None = None) -> Path:
    """`model`'s folder at `dest`, all of it or only the files `names`."""
    dest.mkdir()
    for f in model.iterdir():
        if names is None or f.name in names:
            shutil.copy(f, dest / f.name)
    return dest


def _weights_only(model: Path, dest: Path) -> Path:
    return _copy(model, dest, WEIGHTS_ONLY)


def _unreadable_tokenizer(model: Path, dest: Path) -> Path:
    folder = _copy(model, dest)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return folder


def _fails_before_submitting(tmp_path, cfg: Path, sets: list[str], monkeypatch, capsys) -> str:
    """The driver's stderr; it must exit 2 having neither submitted a stage nor created anything."""
    monkeypatch.setattr(Driver, "run_iteration", lambda *a, **k: pytest.fail("submitted with a broken model"))
    args = ["--config", str(cfg), "--executor", "local"] + [a for s in sets for a in ("--set", s)]
    assert driver_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert snapshot(tmp_path / "runs") == {}
    return err


BROKEN = {
    "weights without tokenizer files": (
        _weights_only, "neither file is in the folder, and transformers builds a vocabulary of 1 token from it)"),
    "unreadable tokenizer.json": (
        _unreadable_tokenizer, "tokenizer.json: Expecting value: line 1 column 29 (char 28))"),
}


@pytest.mark.parametrize("key", ["teacher", "student"])
@pytest.mark.parametrize("case", BROKEN)
def test_a_model_folder_without_a_working_tokenizer_is_refused_by_the_driver(case, key, tmp_path, tiny_world,
                                                                              monkeypatch, capsys):
    make, why = BROKEN[case]
    folder = make(getattr(tiny_world, key), tmp_path / "model")
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    err = _fails_before_submitting(tmp_path, cfg, [f"models.{key}={folder}"], monkeypatch, capsys)
    assert err == (f"error: {cfg}: models.{key}: {folder} has no usable tokenizer (tokenizer.json / "
                   f"tokenizer_config.json missing or unreadable: {why}\n")


def test_chat_template_kwargs_for_a_model_without_a_chat_template_are_refused(tmp_path, tiny_world, monkeypatch,
                                                                              capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert check_inputs(load_config(cfg)) == []  # the tokenizers work, and are remembered as checked
    sets = ["prompt.chat_template_kwargs.enable_thinking=false"]
    err = _fails_before_submitting(tmp_path, cfg, sets, monkeypatch, capsys)
    assert err == (f"error: {cfg}: models.teacher: {tiny_world.teacher} has no chat template, so "
                   "prompt.chat_template_kwargs (enable_thinking) would be ignored and prompts sent as plain text; "
                   "remove them, or use a model that ships a chat template\n")
    # Without the chat template the arguments were never meant to reach one.
    assert check_inputs(load_config(cfg, [*sets, "prompt.use_chat_template=false"])) == []


def test_chat_template_kwargs_pass_for_models_that_ship_a_chat_template(tmp_path, tiny_world):
    models = {}
    for key in ("teacher", "student"):
        models[key] = _copy(getattr(tiny_world, key), tmp_path / key)
        (models[key] / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    sets = [f"models.{k}={p}" for k, p in models.items()] + ["prompt.chat_template_kwargs.enable_thinking=false"]
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), sets)
    assert check_inputs(cfg) == []


def test_the_tiny_models_pass(tmp_path, tiny_world):
    assert check_inputs(load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"))) == []


def test_hub_ids_are_not_loaded_here(tmp_path, tiny_world, monkeypatch):
    import distill.preflight

    monkeypatch.setattr(distill.preflight, "load_local_tokenizer", lambda path: pytest.fail(f"loaded {path}"))
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["models.teacher=tiny-org/teacher", "models.student=tiny-org/student@v2"])
    check_tokenizers(cfg)


def test_importing_the_checks_leaves_transformers_unloaded():
    out = run_python("import sys, distill.preflight, jobs.driver; print('transformers' in sys.modules)")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_checked_tokenizer_is_not_loaded_again_until_its_folder_changes(tmp_path, tiny_world):
    """A driver with nothing to submit must answer without importing transformers."""
    folder = _copy(tiny_world.teacher, tmp_path / "model")
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    code = (f"import sys; from distill.config import load_config; from distill.preflight import check_tokenizers; "
            f"check_tokenizers(load_config({str(cfg)!r}, ['models.teacher={folder}'])); "
            "print('transformers' in sys.modules)")
    first, again = run_python(code, timeout=120), run_python(code, timeout=120)
    assert (first.stdout, again.stdout) == ("True\n", "False\n"), first.stderr + again.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ConfigError, match=rf"models.teacher: {folder} has no usable tokenizer"):
        check_tokenizers(load_config(cfg, [f"models.teacher={folder}"]))


def test_a_cache_that_cannot_be_written_only_means_checking_again(tmp_path, tiny_world, own_cache):
    own_cache.write_text("not a directory")
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"))
    check_tokenizers(cfg)
    check_tokenizers(cfg)


def test_check_inputs_names_the_model_key(tmp_path, tiny_world):
    folder = _weights_only(tiny_world.student, tmp_path / "model")
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), [f"models.student={folder}"])
    with pytest.raises(ConfigError, match=rf"^{cfg.source}: models.student: {folder} has no usable tokenizer \("):
        check_inputs(cfg)
