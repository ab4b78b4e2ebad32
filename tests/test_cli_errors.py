"""The CLI as a user meets it: every flag's help shows its default, ``--help`` imports no torch, a user's
mistake is one stderr line with exit code 2 (no traceback), a missing extra is named with its pip
command before any work, and a bug still shows its traceback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskkv_engine.entrypoints import cli
from maskkv_engine.sampling_params import DEFAULT_GEN_LENGTH

ROOT = Path(__file__).parents[1]

# Runs cli.main(argv) in a fresh interpreter where the named top-level packages cannot be imported: a
# meta-path finder ahead of the real ones refuses them, exactly what Python says when one is not installed.
_RUNNER = """
import json, sys
argv, blocked = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.split(".")[0] in blocked:
        del sys.modules[name]
from maskkv_engine.entrypoints import cli
sys.exit(cli.main(argv))
"""


def run_cli(argv: list[str], block: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # other test files turn triton's CPU interpreter on for this process
    cmd = [sys.executable, "-c", _RUNNER, json.dumps(argv), json.dumps(list(block))]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"maskkv {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert cli.main(["random-checkpoint", "--out", str(path), "--hidden", "32", "--heads", "2", "--vocab", "64"]) == 0
    return path


# ---- user mistakes: one line, exit 2 ------------------------------------------------------------------------
def test_missing_prompt_file(tiny_model, tmp_path):
    missing = tmp_path / "nope.txt"
    proc = run_cli(["generate", "--model", str(tiny_model), "--prompt-file", str(missing)])
    assert_one_line_error(proc, "generate", f"--prompt-file={str(missing)!r} is not a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_backend_without_a_gpu(tiny_model):
    proc = run_cli(["generate", "--model", str(tiny_model), "--prompt", "w1", "--attention-backend", "triton"])
    assert_one_line_error(proc, "generate", "--attention-backend triton", "needs a CUDA device")


def test_triton_backend_without_triton(tiny_model):
    proc = run_cli(["generate", "--model", str(tiny_model), "--prompt", "w1", "--attention-backend", "triton"],
                   block=("triton",))  # fmt: skip
    assert_one_line_error(proc, "generate", "--attention-backend triton")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--layers", "0"], "--layers=0 must be an integer >= 1"),
        (["--hidden", "-8"], "--hidden=-8 must be an integer >= 1"),
        (["--kv-heads", "0"], "--kv-heads=0 must be an integer >= 1"),
        (["--hidden", "30", "--heads", "4"], "--hidden=30 must be a multiple of --heads=4"),
    ],
)
def test_random_checkpoint_bad_sizes(tmp_path, capsys, flags, needle):
    """In-process (the same handler as the binary): cheap enough for several cases; nothing is written."""
    out = tmp_path / "ckpt"
    assert cli.main(["random-checkpoint", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskkv random-checkpoint: error: ") and err.count("\n") == 1, err
    assert needle in err and not out.exists()


def test_random_checkpoint_zero_layers_as_a_process(tmp_path):
    proc = run_cli(["random-checkpoint", "--out", str(tmp_path / "x"), "--layers", "0"])
    assert_one_line_error(proc, "random-checkpoint", "--layers=0")


def test_missing_model_directory(tmp_path):
    proc = run_cli(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert_one_line_error(proc, "generate", str(tmp_path / "nowhere"), "is not a local directory")


def test_bad_sampling_flag_fails_before_the_model_loads(capsys):
    assert cli.main(["generate", "--model", "/does/not/matter", "--prompt", "hi", "--gen-length", "0"]) == 2
    assert "gen_length=0" in capsys.readouterr().err  # SamplingParams, not the missing model


def test_calibrate_missing_prompts_file(tmp_path, capsys):
    assert cli.main(["calibrate", "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err.startswith("maskkv calibrate: error: --prompts-file=")


# ---- missing extras: named with their pip command, before any work ------------------------------------------
@pytest.mark.parametrize(
    ("argv", "block", "names"),
    [
        (["serve"], ("fastapi",), ["maskkv serve needs fastapi", 'pip install -e ".[serve]"']),
        (["serve"], ("uvicorn",), ["uvicorn", 'pip install -e ".[serve]"']),
        (["serve", "--ray"], ("ray",), ["maskkv serve --ray needs ray", 'pip install -e ".[ray]"']),
        (["bench", "--shape", "tiny"], ("psutil",), ["maskkv bench needs psutil", 'pip install -e ".[bench]"']),
        (["bench", "--plot", "x.png"], ("matplotlib",), ["matplotlib", 'pip install -e ".[bench]"']),
    ],
    ids=["serve-fastapi", "serve-uvicorn", "serve-ray", "bench-psutil", "bench-matplotlib"],
)
def test_missing_extra_is_named_first(argv, block, names):
    start = time.perf_counter()
    proc = run_cli(argv, block=block)
    assert_one_line_error(proc, argv[0], *names)
    assert "torch" not in proc.stderr
    assert time.perf_counter() - start < 60  # no model, no benchmark ran first (bench alone took 33 s)


def test_bench_help_needs_no_extra():
    proc = run_cli(["bench", "--help"], block=("psutil", "matplotlib"))
    assert proc.returncode == 0 and "--shape" in proc.stdout, proc.stderr


# ---- bugs keep their traceback ------------------------------------------------------------------------------
def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_random_checkpoint", broken)
    parser = cli.build_parser()
    assert parser.parse_args(["random-checkpoint", "--out", "x"]).func is broken
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["random-checkpoint", "--out", "x"])


def test_expected_errors_are_one_line(monkeypatch, capsys):
    def fails(args):
        raise FileNotFoundError(2, "No such file or directory", "/x/y")

    monkeypatch.setattr(cli, "cmd_random_checkpoint", fails)
    assert cli.main(["random-checkpoint", "--out", "x"]) == 2
    assert capsys.readouterr().err == "maskkv random-checkpoint: error: [Errno 2] No such file or directory: '/x/y'\n"


# ---- help ---------------------------------------------------------------------------------------------------
def test_help_imports_no_torch():
    code = (
        "import sys\nfrom maskkv_engine.entrypoints import cli\n"
        "for argv in (['--help'], ['generate', '--help'], ['random-checkpoint', '--help'], ['serve', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('no torch')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "no torch" in proc.stdout, proc.stderr


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["generate", "calibrate", "random-checkpoint"])
def test_every_flag_has_help_and_shows_its_default(command):
    p = _subparser(command)
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        assert action.help, f"{command} {flag} has no help text"
        if action.default is not None and not isinstance(action.default, bool):
            assert "%(default)" in p._get_formatter()._get_help_string(action), f"{command} {flag} hides its default"
        elif (
            not isinstance(action.default, bool)
            and not action.required
            and action.dest not in ("prompt", "prompt_file")
        ):
            assert "(default" in action.help, f"{command} {flag}: say what leaving it unset means"
    for shown in (f"(default: {DEFAULT_GEN_LENGTH})", "(default: 0.0)", "(default: auto)") if command == "generate" else ():
        assert shown in " ".join(text.split()), shown


def test_random_checkpoint_help_lists_every_default():
    text = " ".join(_subparser("random-checkpoint").format_help().split())
    for default in ("llada", "128", "2", "4", "256", "512", "32768", "0"):
        assert f"(default: {default})" in text, default


# ---- a bad checkpoint through the other commands that load one ----------------------------------------------
@pytest.fixture
def broken_model(tiny_model, tmp_path) -> Path:
    import shutil

    path = tmp_path / "broken"
    shutil.copytree(tiny_model, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_kv_heads"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_serve_bad_checkpoint_is_one_line(broken_model):
    proc = run_cli(["serve", "--model", str(broken_model), "--port", "0"])
    assert_one_line_error(proc, "serve", f"{broken_model / 'config.json'}: n_kv_heads=0")


def test_calibrate_bad_checkpoint_is_one_line(broken_model, capsys):
    assert cli.main(["calibrate", "--model", str(broken_model), "--num-prompts", "1", "--prompt-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err == f"maskkv calibrate: error: {broken_model / 'config.json'}: n_kv_heads=0 must be an integer >= 1\n"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["random-checkpoint", "--out", "x", "--layers", "abc"], "argument --layers: invalid int value: 'abc'"),
        (["generate", "--model", "x"], "one of the arguments --prompt --prompt-file is required"),
        (["generate", "--prompt", "a", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_argparse_errors_are_one_line_too(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"maskkv {argv[0]}: error: ") and needle in err, err
