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
    lines += [f"  {name}: {why}" for name, why in result["reasons"].items()]
    lines += [f"  {s['score']:8.2f}  {s['identity']}  {s['path']}"
              + (f"  (looks like {s['looks_like']})" if s["looks_like"] else "")
              for s in result["suspects"]]
    if result["skipped"]:
        lines.append(f"not scanned ({len(result['skipped'])}):")
        lines += [f"  {s['path']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def run(args, load_model_or_preset):
    from tfadv.poisoning.scan import scan_folder

    cfg = build(PoisonScanConfig, args)
    model = load_model_or_preset(None if cfg.model else cfg.preset, cfg.model)
    result = scan_folder(args.data_dir, model=model, method=cfg.method,
                         detector=None if cfg.crop else "none",
                         size=int(model.input_shape[1]), progress=not args.json)
    result.pop("flags")
    print(json.dumps(result) if args.json else markdown(result))
