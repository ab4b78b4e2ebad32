"""``maskkv``: generate | serve | bench | calibrate | random-checkpoint.

Importing this module needs neither torch nor any extra: each command imports what it uses, so
``maskkv --help`` is instant. A user's mistake (a bad flag value, a bad checkpoint, a missing file or
extra) ends in one line, ``maskkv <command>: error: ...``, and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

from maskkv_engine.entrypoints.openai.cli_args import add_serve_args
from maskkv_engine.presets import PRESETS, sampling_params
from maskkv_engine.sampling_params import DEFAULT_GEN_LENGTH


class MissingExtraError(ImportError):
    """An optional dependency group (pyproject extra) a command needs is not installed."""


def require_extra(extra: str, modules: list[str], what: str) -> None:
    """Check before any work that ``modules`` can be imported; name the extra that installs them."""
    missing = []
    for name in modules:
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingExtraError(f'{what} needs {", ".join(missing)} (not installed): pip install -e ".[{extra}]"')


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help already says what an unset (None) flag means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad int, a missing flag) follow the same one-line rule: no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag}={value} must be an integer >= 1")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local model directory (default: the embedded default model)")
    p.add_argument("--kv-policy", default=None,
                   help="none | full | maskkv | snapkv | pyramidkv | adakv | squeeze (default: maskkv, or the preset's)")  # fmt: skip
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a published setting (maskkv_engine/presets.py); flags given explicitly win (default: none)")  # fmt: skip
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="query rows per chunk of a first pass: bounds its activation memory (default: 2048)")  # fmt: skip
    p.add_argument("--kv-budget", type=int, default=None,
                   help="prompt KV pairs kept per head on average (default: the policy's own)")  # fmt: skip
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (float32 on the CPU, the checkpoint's half type on a GPU)")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (a GPU when there is one)")
    p.add_argument("--attention-backend", default=None,
                   help="torch | triton | xformers (default: triton on a GPU, torch on the CPU)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="engine seed (sampling with temperature > 0)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(kv_policy=args.kv_policy, kv_budget=args.kv_budget, dtype=args.dtype, device=args.device,
              seed=args.seed, preset=args.preset)  # fmt: skip
    if args.attention_backend:
        kw["attention_backend"] = args.attention_backend
    if args.prefill_chunk_size is not None:
        kw["prefill_chunk_size"] = args.prefill_chunk_size
    return kw


def _check_engine_args(args: argparse.Namespace) -> None:
    """Refuse what the engine would refuse, before the weights load: the same selector, its error on one line."""
    _positive_int("--kv-budget", args.kv_budget)
    _positive_int("--prefill-chunk-size", args.prefill_chunk_size)
    if not args.attention_backend:
        return
    from maskkv_engine.attention.selector import get_attention_backend
    from maskkv_engine.config import EngineConfig

    device = EngineConfig(model="", device=args.device).torch_device
    try:
        get_attention_backend(args.attention_backend, device)
    except (RuntimeError, ImportError) as e:  # no GPU, no triton / xformers
        raise ValueError(f"--attention-backend {args.attention_backend}: {e}") from e


def _read_text(flag: str, path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{flag}={path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if args.prompt_file is not None:
        prompt = _read_text("--prompt-file", args.prompt_file).strip()
    from maskkv_engine import LLM

    given = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                 temperature=args.temperature, remasking=args.remasking, threshold=args.threshold)  # fmt: skip
    # validated before the model loads; the preset's defaults (e.g. paper: block_length 8) under the flags
    sp = sampling_params(args.preset, **{k: v for k, v in given.items() if v is not None})
    _check_engine_args(args)
    llm = LLM(args.model, **_engine_kwargs(args))
    start = time.perf_counter()
    if args.chat:
        outs = llm.chat([{"role": "user", "content": prompt}], sp, use_tqdm=False)
    else:
        outs = llm.generate(prompt, sp, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out = outs[0]
    if args.json:
        m = out.metrics
        print(
            json.dumps(
                {
                    "text": out.outputs[0].text,
                    "token_ids": out.outputs[0].token_ids,
                    "finish_reason": out.outputs[0].finish_reason,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "kv_tokens_kept": m.kv_tokens_kept,
                    "steps": m.num_steps,
                    "seconds": round(elapsed, 4),
                }
            )
        )
    else:
        print(out.outputs[0].text)
        cfg = llm.llm_engine.model_config
        full = len(out.prompt_token_ids) * cfg.num_layers * cfg.num_kv_heads
        kept = out.metrics.kv_tokens_kept
        share = f"{100.0 * kept / full:.1f}%" if full and llm.llm_engine.policy.caches else "n/a"
        print(
            f"[{llm.llm_engine.config.kv_policy}] prompt {len(out.prompt_token_ids)} tokens, KV kept {kept} of {full} pairs ({share}), "
            f"{out.metrics.num_steps} steps, {elapsed:.2f}s",
            file=sys.stderr,
        )
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    for flag in ("hidden", "layers", "heads", "kv_heads", "mlp", "vocab", "max_len"):
        _positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.hidden % args.heads:
        raise ValueError(f"--hidden={args.hidden} must be a multiple of --heads={args.heads}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        raise ValueError(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
    if (args.hidden // args.heads) % 2:
        raise ValueError(f"--hidden / --heads = {args.hidden // args.heads} must be even (rotary embedding)")
    if args.vocab < 8:  # the word tokenizer's specials plus a few words
        raise ValueError(f"--vocab={args.vocab} must be >= 8")
    from maskkv_engine.models.random_checkpoint import (
        dream_config,
        llada_config,
        write_checkpoint,
        write_word_tokenizer,
    )
    from maskkv_engine.models.registry import parse_config

    if args.arch == "llada":
        cfg = llada_config(
            d_model=args.hidden, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
            mlp_hidden_size=args.mlp, vocab_size=args.vocab, max_sequence_length=args.max_len,
        )  # fmt: skip
    else:
        cfg = dream_config(
            hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, intermediate_size=args.mlp, vocab_size=args.vocab,
            max_position_embeddings=args.max_len,
        )  # fmt: skip
    parse_config(cfg)  # what the loader will check, before anything is written
    path = write_checkpoint(args.out, cfg, seed=args.seed)
    mask = cfg["mask_token_id"]
    eos = cfg["eos_token_id"]
    write_word_tokenizer(path, args.vocab, mask, eos)
    print(f"wrote a random-weight {args.arch} checkpoint (released layout, word tokenizer w0 w1 ...) to {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    for flag in ("num_prompts", "prompt_len", "gen_length"):
        _positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    prompts = None
    if args.prompts_file:
        lines = [line.rstrip("\n") for line in _read_text("--prompts-file", args.prompts_file).splitlines()]
        prompts = []
        for n, line in enumerate((line for line in lines if line.strip()), 1):
            try:  # a JSON id list, or text
                prompts.append(json.loads(line) if line.startswith("[") else line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts-file={args.prompts_file!r}: prompt {n} is not a JSON list ({e})") from e
    from maskkv_engine.kv.calibrate import calibrate
    from maskkv_engine.kv.profile import PROFILE_FILE
    from maskkv_engine.llm import default_model_path

    model = args.model or default_model_path()
    out = args.out or f"{model}/{PROFILE_FILE}"
    if prompts is not None and args.random_prompts:
        raise ValueError("--prompts-file and --random-prompts exclude each other: give one")
    stats = calibrate(
        model, prompts, gen_length=args.gen_length, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
        seed=args.seed, dtype=args.dtype, device=args.device, out=out, random_prompts=args.random_prompts,
    )  # fmt: skip
    print(f"wrote {out}: layer importance {[round(float(x), 4) for x in stats.layer_importance]}")
    return 0


def cmd_serve_checked(args: argparse.Namespace) -> int:
    """The extras first (a missing fastapi should not wait for the weights), then the server."""
    if args.ray:
        require_extra("serve", ["fastapi", "prometheus_client"], "maskkv serve --ray")
        require_extra("ray", ["ray"], "maskkv serve --ray")
    else:
        require_extra("serve", ["fastapi", "uvicorn", "prometheus_client"], "maskkv serve")
    _check_engine_args(args)
    return cmd_serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    argv = args.bench_argv
    if not {"-h", "--help"} & set(argv):  # the help needs no extra
        require_extra("bench", ["psutil"], "maskkv bench")
        if any(a == "--plot" or a.startswith("--plot=") for a in argv):
            require_extra("bench", ["matplotlib"], "maskkv bench --plot")
    from maskkv_engine.benchmarks.speed_memory import main as bench_main

    bench_main(argv, script="maskkv bench")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskkv", description="Diffusion LM inference with per-head pruned, paged KV.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

    g = add("generate", help="generate a completion for one prompt")
    _add_engine_args(g)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt text from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH, help="response tokens to generate")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length, one token a step)")
    g.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block, a divisor of gen-length (default: gen-length, one block)")  # fmt: skip
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--remasking", default="low_confidence",
                   help="which masked positions are committed first: LLaDA low_confidence | random; "
                        "Dream origin | maskgit_plus | topk_margin | entropy")  # fmt: skip
    g.add_argument("--threshold", type=float, default=None,
                   help="confidence threshold for parallel decoding (default: the fixed step schedule)")  # fmt: skip
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    c = add("calibrate", help="measure layer importance and head prompt preference (the MaskKV profile)")
    c.add_argument("--model", default=None, help="local model directory (default: the embedded default model)")
    c.add_argument("--out", default=None, help="profile path (default: <model>/maskkv_profile.json)")
    c.add_argument("--prompts-file", default=None,
                   help="one prompt per line: text, or a JSON list of token ids (default: windows of the shipped "
                        "public-domain English text, through the model's tokenizer)")  # fmt: skip
    c.add_argument("--random-prompts", action="store_true",
                   help="calibrate on random token ids instead (only for random-weight test models)")  # fmt: skip
    c.add_argument("--num-prompts", type=int, default=8, help="prompts when no file is given")
    c.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt when no file is given")
    c.add_argument("--gen-length", type=int, default=32, help="masked response tokens after each prompt")
    c.add_argument("--seed", type=int, default=0, help="seed of --random-prompts")
    c.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    c.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    c.set_defaults(func=cmd_calibrate)

    s = add("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn, or Ray Serve with --ray)")
    _add_engine_args(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve_checked)

    r = add("random-checkpoint", help="write a random-weight checkpoint in the released layout")
    r.add_argument("--out", required=True, help="directory to write (created if absent)")
    r.add_argument("--arch", choices=["llada", "dream"], default="llada", help="released layout to follow")
    r.add_argument("--hidden", type=int, default=128, help="hidden size (d_model / hidden_size)")
    r.add_argument("--layers", type=int, default=2, help="transformer layers")
    r.add_argument("--heads", type=int, default=4, help="query heads (a divisor of --hidden)")
    r.add_argument("--kv-heads", type=int, default=None, help="KV heads, a divisor of --heads (default: --heads, MHA)")
    r.add_argument("--mlp", type=int, default=256, help="MLP hidden size")
    r.add_argument("--vocab", type=int, default=512, help="vocabulary size (>= 8)")
    r.add_argument("--max-len", type=int, default=32768, help="max positions (max_sequence_length)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    r.set_defaults(func=cmd_random_checkpoint)

    b = sub.add_parser(
        "bench",
        add_help=False,  # its options belong to the benchmark: `maskkv bench --help` lists them
        help="speed and memory per KV policy against the reference decoder (random weights; --help for options)",
    )
    b.set_defaults(func=cmd_bench)
    return parser


def _expected_error(e: BaseException) -> bool:
    """A user's mistake, as opposed to a bug. CheckpointError is a ValueError."""
    return isinstance(e, (ValueError, OSError, MissingExtraError))


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server: uvicorn here, or Ray Serve replicas with --ray."""
    if args.ray:
        from maskkv_engine.distributed.ray_serve import run_ray_serve

        return run_ray_serve(args)
    from maskkv_engine.entrypoints.openai.api_server import run_server

    return run_server(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_argv = rest
    elif rest:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"maskkv {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _expected_error(e):
            raise  # a bug: keep the traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"maskkv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
