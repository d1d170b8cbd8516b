"""A training run's output folder: a killed run resumes only as itself, a finished one is kept.

`tfadv train mnist` and `tfadv facenet finetune` resume a killed run from
`out/backup` (the last finished epoch). Two mistakes used to pass silently:
resuming with other settings (the weights of one run continued under the
settings of another, recorded as the second) and running the command again
after the run finished (the finished model was trained over). `claim` checks
both before any training: the run's settings are kept in `out/run.json`.
"""

from __future__ import annotations

import json
import os

from tfadv.files import output_dir, read_json_or_empty, write_json

__all__ = ["RUN_FILE", "check_resumed_epochs", "claim"]

RUN_FILE = "run.json"


def _flat(config: dict, key: str = "") -> dict:
    out = {}
    for k, v in config.items():
        dotted = f"{key}.{k}" if key else k
        if isinstance(v, dict):
            out.update(_flat(v, dotted))
        else:
            out[dotted] = v
    return out


def _differences(old: dict, new: dict, mutable, options, defaults=None) -> list[str]:
    missing = object()
    # A setting added after the run was recorded: the run ran as its default.
    old = {**_flat(defaults or {}), **_flat(old)}
    new = _flat(new)
    keys = sorted(k for k in set(old) | set(new)
                  if k not in mutable and k.split(".")[0] not in mutable)

    def show(value):
        return "(unset)" if value is missing else repr(value)

    return [f"{options.get(k, k)}: {show(old.get(k, missing))} -> {show(new.get(k, missing))}"
            for k in keys if old.get(k, missing) != new.get(k, missing)]


def claim(out, config: dict, *, finished: str | None, mutable=(), overwrite=False,
          backup="backup", options=None, epochs=None, defaults=None) -> str:
    """Checks that a run may write to `out`, and records its settings there.

    Args:
        out: the run's output folder (created if missing).
        config: the run's settings, JSON-serialisable.
        finished: the file (in `out`) a finished run leaves, e.g. "metrics.json";
            None where a finished run's state is reused, not overwritten.
        mutable: settings a resumed run may change (e.g. "epochs": a run may be
            extended); they are updated in `run.json`.
        overwrite: train again over a finished run.
        backup: the file or folder (in `out`) a killed run resumes from.
        options: {setting: command-line option} (`tfadv.config.options.option_names`),
            so that a refusal names the options the user typed; nested settings
            by dotted key.
        epochs: the epochs the run asks for; a resumed run may not ask for
            fewer than it finished (`check_resumed_epochs`).
        defaults: the settings' defaults, shaped like `config`: a setting
            missing from an older run's record (added to the program since)
            counts as its default, so the run still resumes.

    Returns:
        "resume" (a backup of the same run is there), "overwrite" (a finished
        run is there and `overwrite` is set) or "new".

    Raises:
        ValueError: a backup is there and its run had other settings (the
            message lists them); resume with the same settings, or move the
            folder away. Or it finished more than `epochs` epochs. Nothing is
            written when refused.
        FileExistsError: a finished run is there and `overwrite` is not set.
    """
    out = os.fspath(out)
    output_dir(out)
    record = os.path.join(out, RUN_FILE)
    config = json.loads(json.dumps(config))
    state = "new"
    if os.path.exists(os.path.join(out, backup)):
        old = read_json_or_empty(record)
        defaults = json.loads(json.dumps(defaults or {}))
        diff = _differences(old, config, mutable, options or {}, defaults) if old else []
        if diff:
            raise ValueError(
                f"{out} holds a killed run with other settings ({'; '.join(diff)}). Run the "
                f"same command to resume it, or give another output folder (or delete "
                f"{os.path.join(out, backup)} to start afresh).")
        if epochs is not None:
            check_resumed_epochs(out, epochs)
        state = "resume"
    elif finished is not None and os.path.exists(os.path.join(out, finished)):
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a finished run ({finished}). Give another output folder, or "
                "--overwrite to train again over it.")
        state = "overwrite"
    write_json(record, config)
    return state


def check_resumed_epochs(out, epochs, *, history="history.json") -> int:
    """Refuses to resume a run for fewer epochs than it has finished.

    Args:
        out: the run's folder; `history` in it lists the finished epochs
            (`{"epoch": [...]}`, as `tfadv.trainers.JSONHistory` writes it).
        epochs: the epochs the resumed run asks for.

    Returns:
        The number of finished epochs.

    Raises:
        ValueError: `epochs` is below it (nothing would train, and the
            results would record settings that never ran).
    """
    done = len(read_json_or_empty(os.path.join(os.fspath(out), history)).get("epoch", []))
    if int(epochs) < done:
        raise ValueError(f"{out} holds a killed run that has finished {done} epochs; "
                         f"--epochs {epochs} would record settings that never ran. Give "
                         f"--epochs {done} or more to resume it.")
    return done
