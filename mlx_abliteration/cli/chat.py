"""``mlx-abliterate chat``: talk to a model in the terminal, optionally next to the original."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from mlx_abliteration.data.chat import encode_messages, template_check
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.asset_resolver import resolve_asset
from mlx_abliteration.io.model_io import check_model_dir, load_model
from mlx_abliteration.io.output_dir import check_cache_dir

HELP = "interactive streaming chat with a model (optionally compared with the original)"
DESCRIPTION = (
    "Each line you type is a user turn of one conversation (through the chat template); the answer "
    "streams as it is generated. With --compare, the original model answers the same prompt in its "
    "own conversation after it (or next to it with --side-by-side). /reset starts a new conversation; "
    "/exit or Ctrl-D quits."
)
EXIT_COMMANDS = {"/exit", "/quit", "/bye"}
RESET_COMMAND = "/reset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="model to chat with: local dir, .gguf file or hub id")
    parser.add_argument("--compare", metavar="ORIGINAL", help="a second model answering every prompt too")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--system-prompt", help="system message for every prompt")
    parser.add_argument(
        "--side-by-side", action="store_true", help="with --compare: print both answers in two columns when done"
    )
    parser.add_argument("--cache-dir", help="where hub/GGUF models are cached")


def main(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {args.max_tokens})")

    check_cache_dir(args.cache_dir)
    if args.side_by_side and not args.compare:
        raise UserError("--side-by-side needs --compare ORIGINAL")
    paths = {"model": args.model}
    if args.compare:
        paths["original"] = args.compare
    resolved = {name: check_model_dir(resolve_asset(path, args.cache_dir)) for name, path in paths.items()}
    chats = [
        _Chat(
            name,
            *load_model(path, check_tokenizer=template_check(paths[name], args.system_prompt))[:2],
            args.system_prompt,
        )
        for name, path in resolved.items()
    ]
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a prompt and press Enter; /reset starts over, /exit or Ctrl-D quits.")
    while True:
        if interactive:
            print("\n> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_COMMANDS:
            break
        prompt = line.strip()
        if prompt == RESET_COMMAND:
            for chat in chats:
                chat.reset(args.system_prompt)
        elif prompt:
            _answer(chats, prompt, args)
    return 0


class _Chat:
    """One model and its conversation so far."""

    def __init__(self, name: str, model, tokenizer, system_prompt: str | None = None):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.reset(system_prompt)

    def reset(self, system_prompt: str | None) -> None:
        self.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def stream(self, prompt: str, args: argparse.Namespace):
        """Yield the answer's text pieces as tokens are generated; remember the turn."""
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        self.messages.append({"role": "user", "content": prompt})
        tokens = encode_messages(self.tokenizer, self.messages)
        sampler = make_sampler(temp=args.temp)
        answer = []
        for response in stream_generate(self.model, self.tokenizer, tokens, args.max_tokens, sampler=sampler):
            answer.append(response.text)
            yield response.text
        self.messages.append({"role": "assistant", "content": "".join(answer)})


def _answer(chats: list[_Chat], prompt: str, args: argparse.Namespace) -> None:
    if args.side_by_side:
        answers = ["".join(chat.stream(prompt, args)) for chat in chats]
        print(_columns([c.name for c in chats], answers, shutil.get_terminal_size().columns))
        return
    for chat in chats:
        if len(chats) > 1:
            print(f"\n── {chat.name} ──")
        for piece in chat.stream(prompt, args):
            print(piece, end="", flush=True)
        print()


def _columns(titles: list[str], texts: list[str], width: int) -> str:
    """Texts wrapped into equal columns under their titles."""
    gap = " │ "
    column = max(20, (width - len(gap) * (len(texts) - 1)) // len(texts))
    wrapped = [_wrap(t, column) for t in texts]
    height = max(len(w) for w in wrapped)
    rows = [gap.join(t.ljust(column) for t in titles), gap.join("─" * column for _ in titles)]
    for i in range(height):
        rows.append(gap.join((w[i] if i < len(w) else "").ljust(column) for w in wrapped).rstrip())
    return "\n".join(rows)


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""]
    return lines
