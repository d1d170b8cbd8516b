"""`tfadv poison scan`: suspect photos of a face folder, found in the embedder's embeddings."""

from __future__ import annotations

import json

from tfadv.config.options import add_command, add_group, build
from tfadv.config.poisoning import PoisonScanConfig


def add(subparsers, load_model_or_preset):
    """Adds the `poison` group; `load_model_or_preset(preset, model)` is the recipe's loader."""
    group = add_group(subparsers, "poison", help="data poisoning: scan training photos",
                      dest="poison_command")
    c = add_command(group, "scan", lambda args: run(args, load_model_or_preset),
                    configs=(PoisonScanConfig,),
                    help="list the photos of a face folder that look planted (never changes "
                         "or deletes a file)")
    c.add_argument("data_dir", help="a folder with one sub-folder of photos per identity")
    c.add_argument("--json", action="store_true", help="print one JSON object only")


def markdown(result) -> str:
    lines = [f"{result['folder']}: {result['images']} photos, {result['flagged']} suspect "
             f"({result['method']}); suspect identities: "
             f"{', '.join(result['suspect_identities']) or 'none'}"]
    lines += [f"warning: {w}" for w in result["warnings"]]
    if result["unchecked"]:
        lines.append(f"not checked (fewer than 4 photos): {', '.join(result['unchecked'])}")
    lines += [f"  {name}: {why}" for name, why in result["reasons"].items()]
    lines += [f"  {s['score']:8.2f}  {s['identity']}  {s['path']}"
              + (f"  (looks like {s['looks_like']}: cosine {s['looks_like_cosine']:.2f})"
                 if s["looks_like"] else "")
              for s in result["suspects"]]
    if result["skipped"]:
        lines.append(f"not scanned ({len(result['skipped'])}):")
        lines += [f"  {s['path']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def run(args, load_model_or_preset):
    from tfadv.poisoning.scan import scan_folder

    cfg = build(PoisonScanConfig, args)
    model = load_model_or_preset(None if cfg.model else cfg.preset, cfg.model)
    shape, out = tuple(model.input_shape), tuple(model.output_shape)
    if (len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3
            or len(out) != 2):
        raise ValueError(f"Expected a face embedder: square RGB crops [N, S, S, 3] in, "
                         f"embeddings [N, D] out. The model takes {shape} and gives {out}.")
    result = scan_folder(args.data_dir, model=model, method=cfg.method,
                         detector=None if cfg.crop else "none",
                         size=int(shape[1]), progress=not args.json)
    result.pop("flags")
    print(json.dumps(result) if args.json else markdown(result))
