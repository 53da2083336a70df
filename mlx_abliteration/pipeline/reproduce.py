"""``mlx-abliterate run --reproduce OUT/abliteration_log.json``: re-run a recorded abliteration and compare weights.

The log holds every setting (``parameters``), the SHA256 of each prompt set's
contents (``prompts_sha256``), the versions of the tool and its libraries and
the SHA256 of every output weight file. A reproduction

- refuses (one line) when a prompt set's contents differ from the recorded
  ones: the directions, and so the weights, would differ;
- warns for every package whose version differs (results may differ, the
  run goes on);
- re-runs the one pipeline with the recorded settings and the recorded plan
  source (``run``'s layer choice, a search's plan spec, ``ablate``'s direction
  file), into a new output dir;
- reports, per weight file, whether the new SHA256 equals the recorded one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.config.schema import build_config
from mlx_abliteration.data.datasets import PROMPT_KINDS
from mlx_abliteration.data.prompt_selection import prompt_digests
from mlx_abliteration.edit.strength_schedule import PlanSpec
from mlx_abliteration.errors import UserError
from mlx_abliteration.pipeline.plan_sources import DirectionFile, LayerChoice, PlanFile
from mlx_abliteration.pipeline.records import versions

if TYPE_CHECKING:
    from mlx_abliteration.config.defaults import AbliterationConfig
    from mlx_abliteration.pipeline.plan_sources import PlanSource

# Settings of the recorded run that a reproduction replaces (where it writes, how it prints).
NOT_REPRODUCED = ("output_dir", "overwrite", "dry_run")


def read_log(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "abliteration_log.json"
    if not path.is_file():
        raise UserError(f"--reproduce {path}: no such file; pass the abliteration_log.json of a saved model")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"--reproduce {path} is not readable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("parameters"), dict):
        raise UserError(f"--reproduce {path} is not an abliteration_log.json (no 'parameters')")
    check_log(record, path)
    return record


REPRODUCIBLE = (None, "ablate")  # the log's "command": run and search record none


def _str_map(value: object, required: bool = False) -> bool:
    """A JSON object of strings (``{}`` only where not ``required``)."""
    return (
        isinstance(value, dict)
        and (bool(value) or not required)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    )


def check_log(record: dict, path: str | Path) -> None:
    """Every field a reproduction reads, checked before any work (the log is an untrusted file): one line each."""

    def bad(field: str, expected: str) -> UserError:
        got = type(record.get(field)).__name__ if field in record else "nothing"
        return UserError(
            f"--reproduce {path}: '{field}' should be {expected}, the log has {got}; not a log this tool wrote"
        )

    command = record.get("command")
    if command not in REPRODUCIBLE:
        raise UserError(
            f"--reproduce {path}: a log of `{command}` cannot be reproduced (only run, search and ablate outputs)"
            if isinstance(command, str)
            else bad("command", "a command name")
        )
    prompts = record.get("prompts_sha256")
    if prompts is not None and not (_str_map(prompts) and set(PROMPT_KINDS) <= set(prompts)):
        raise bad("prompts_sha256", f"an object of the {' and '.join(PROMPT_KINDS)} prompts' SHA256")
    if record.get("versions") is not None and not (
        isinstance(record["versions"], dict)
        and all(isinstance(v, (str, type(None))) for v in record["versions"].values())
    ):
        raise bad("versions", "an object of package versions")
    weights = record.get("weights")
    if not isinstance(weights, dict) or not _str_map(weights.get("output_sha256"), required=True):
        if weights is None:
            raise UserError(f"--reproduce {path} records no weight digests ('weights'): there is nothing to compare")
        raise bad("weights", "an object whose 'output_sha256' maps each weight file to its SHA256")
    if record.get("plan_spec") is not None and not isinstance(record["plan_spec"], dict):
        raise bad("plan_spec", "a plan spec object")
    if command == "ablate":
        if not isinstance(record.get("direction_file"), str):
            raise bad("direction_file", "the path of the direction file")
        layer = record.get("chosen_layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise bad("chosen_layer", "a layer index")


@dataclass
class Reproduction:
    config: AbliterationConfig
    plan_source: PlanSource
    warnings: list[str] = field(default_factory=list)


def recorded_config(record: dict, overrides: dict | None = None) -> tuple[AbliterationConfig, list[str]]:
    """The recorded settings (unknown ones, from another tool version, dropped with a warning), then ``overrides``."""

    known = {f.name for f in fields(AbliterationConfig)}
    params = record["parameters"]
    warnings = [f"setting {k!r} of the log is unknown to this version and ignored" for k in sorted(set(params) - known)]
    values = {k: v for k, v in params.items() if k in known and k not in NOT_REPRODUCED}
    config = build_config(values)
    if overrides:
        config = build_config(overrides, config)
    return config, warnings


def version_warnings(record: dict) -> list[str]:
    recorded, now = record.get("versions") or {}, versions()
    out = []
    for name in sorted(set(recorded) | set(now)):
        if name == "platform":
            continue
        if recorded.get(name) != now.get(name):
            out.append(
                f"{name} is {now.get(name, 'not installed')} here, {recorded.get(name, 'absent')} in the log: the weights may differ"
            )
    if recorded.get("platform") and recorded.get("platform") != now.get("platform"):
        out.append(f"platform differs ({now.get('platform')} here, {recorded.get('platform')} in the log)")
    return out


def check_prompts(config: AbliterationConfig, record: dict, log_path: str | Path) -> None:
    recorded = record.get("prompts_sha256")
    if not recorded:
        if record.get("command") == "ablate":
            return  # no prompts: the direction file decides
        raise UserError(f"{log_path} records no prompt digests (written by an older version); it cannot be reproduced")
    now = prompt_digests(config)
    for kind in PROMPT_KINDS:
        if now[kind] != recorded.get(kind):
            where = getattr(config, f"{kind}_dataset") or "the packaged set"
            raise UserError(
                f"the {kind} prompts ({where}) changed since {log_path} was written "
                f"(sha256 {now[kind][:12]}, recorded {str(recorded.get(kind))[:12]}); restore them to reproduce"
            )


def plan_source_for(record: dict) -> PlanSource:
    """The plan source the recorded run used."""

    if record.get("plan_spec"):
        return PlanFile(PlanSpec.from_dict(record["plan_spec"]))
    if record.get("command") == "ablate":
        path = record.get("direction_file")
        if not path or not Path(path).exists():
            raise UserError(
                f"the log's direction file {path} no longer exists; it is needed to reproduce an ablate run"
            )
        return DirectionFile(path, str(record["chosen_layer"]))
    return LayerChoice()


def prepare(log_path: str | Path, overrides: dict | None = None) -> tuple[Reproduction, dict]:
    """Everything checked before any work: the settings, the prompts, the versions, the plan source."""
    record = read_log(log_path)
    config, warnings = recorded_config(record, overrides)
    if not config.output_dir:
        raise UserError("--reproduce needs -o/--output-dir: a new folder for the reproduced model")
    check_prompts(config, record, log_path)
    warnings += version_warnings(record)
    return Reproduction(config, plan_source_for(record), warnings), record


def compare_weights(recorded: dict, written: dict) -> dict:
    """Per weight file: equal SHA256 or not; ``match`` when every file is equal and no file is missing or extra."""
    old = (recorded.get("weights") or {}).get("output_sha256") or {}
    new = (written.get("weights") or {}).get("output_sha256") or {}
    files = {
        name: {"recorded": old.get(name), "reproduced": new.get(name), "match": old.get(name) == new.get(name)}
        for name in sorted(set(old) | set(new))
    }
    return {"match": bool(files) and all(f["match"] for f in files.values()), "files": files}
