"""``maskkv``: generate | serve | bench | calibrate | random-checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time

from maskkv_engine.entrypoints.openai.cli_args import add_serve_args
from maskkv_engine.sampling_params import DEFAULT_GEN_LENGTH


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local model directory (default: the embedded default model)")
    p.add_argument("--kv-policy", default="maskkv", help="none | full | maskkv | snapkv | pyramidkv | adakv | squeeze")
    p.add_argument("--kv-budget", type=int, default=None, help="prompt KV pairs kept per head on average")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--attention-backend", default=None, help="torch | triton | xformers (default: automatic)")
    p.add_argument("--seed", type=int, default=0)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(kv_policy=args.kv_policy, kv_budget=args.kv_budget, dtype=args.dtype, device=args.device, seed=args.seed)
    if args.attention_backend:
        kw["attention_backend"] = args.attention_backend
    return kw


def cmd_generate(args: argparse.Namespace) -> int:
    from maskkv_engine import LLM, SamplingParams

    prompt = args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file) as f:
            prompt = f.read().strip()
    llm = LLM(args.model, **_engine_kwargs(args))
    sp = SamplingParams(
        gen_length=args.gen_length,
        steps=args.steps,
        block_length=args.block_length,
        temperature=args.temperature,
        remasking=args.remasking,
        threshold=args.threshold,
    )
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
            f"[{args.kv_policy}] prompt {len(out.prompt_token_ids)} tokens, KV kept {kept} of {full} pairs ({share}), "
            f"{out.metrics.num_steps} steps, {elapsed:.2f}s",
            file=sys.stderr,
        )
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from maskkv_engine.models.random_checkpoint import (
        dream_config,
        llada_config,
        write_checkpoint,
        write_word_tokenizer,
    )

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
    path = write_checkpoint(args.out, cfg, seed=args.seed)
    mask = cfg["mask_token_id"]
    eos = cfg["eos_token_id"]
    write_word_tokenizer(path, args.vocab, mask, eos)
    print(f"wrote a random-weight {args.arch} checkpoint (released layout, word tokenizer w0 w1 ...) to {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from maskkv_engine.kv.calibrate import calibrate
    from maskkv_engine.kv.profile import PROFILE_FILE
    from maskkv_engine.llm import default_model_path

    model = args.model or default_model_path()
    prompts = None
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        prompts = [json.loads(p) if p.startswith("[") else p for p in prompts]  # a JSON id list, or text
    out = args.out or f"{model}/{PROFILE_FILE}"
    stats = calibrate(
        model, prompts, gen_length=args.gen_length, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
        seed=args.seed, dtype=args.dtype, device=args.device, out=out,
    )  # fmt: skip
    print(f"wrote {out}: layer importance {[round(float(x), 4) for x in stats.layer_importance]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskkv", description="Diffusion LM inference with per-head pruned, paged KV."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_engine_args(g)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt text from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH, help="response tokens (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--block-length", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--remasking", default="low_confidence")
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="measure layer importance and head prompt preference (the MaskKV profile)")
    c.add_argument("--model", default=None, help="local model directory (default: the embedded default model)")
    c.add_argument("--out", default=None, help="profile path (default: <model>/maskkv_profile.json)")
    c.add_argument("--prompts-file", default=None, help="one prompt per line: text, or a JSON list of token ids")
    c.add_argument("--num-prompts", type=int, default=8, help="random prompts when no file is given")
    c.add_argument("--prompt-len", type=int, default=512)
    c.add_argument("--gen-length", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="auto")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn, or Ray Serve with --ray)")
    _add_engine_args(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint in the released layout")
    r.add_argument("--out", required=True)
    r.add_argument("--arch", choices=["llada", "dream"], default="llada")
    r.add_argument("--hidden", type=int, default=128)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--heads", type=int, default=4)
    r.add_argument("--kv-heads", type=int, default=None)
    r.add_argument("--mlp", type=int, default=256)
    r.add_argument("--vocab", type=int, default=512)
    r.add_argument("--max-len", type=int, default=32768)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_random_checkpoint)

    b = sub.add_parser(
        "bench",
        add_help=False,  # its options belong to the benchmark: `maskkv bench --help` lists them
        help="speed and memory per KV policy against the reference decoder (random weights; --help for options)",
    )
    b.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from maskkv_engine.benchmarks.speed_memory import main as bench_main

    bench_main(args.bench_argv, script="maskkv bench")
    return 0


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
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad input: one clear line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
