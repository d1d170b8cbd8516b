"""Poison scan throughput: `tfadv poison scan`'s work against a plain forward pass.

On a face folder (the demo gallery by default, its MTCNN crops cached) and the
pretrained FaceNet: the scan (`tfadv.poisoning.scan_faceset`: the embeddings
plus the defence's linear algebra per identity) against embedding the same
crops and nothing else. The scan is one pass plus linear algebra, so the
target is >= 0.8 of the forward pass's images/s. The two alternate,
`--repeats` times each; medians.

Usage:
    python bench/poison_scan.py [--faces DIR] [--method activations|spectral]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = 0.8


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", default=None, help="folder of identity sub-folders (default: "
                                                 "the demo gallery)")
    p.add_argument("--preset", default="facenet-mscele1m-128")
    p.add_argument("--method", default="activations", choices=("activations", "spectral"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from tfadv import assets
    from tfadv.data import faces as faces_lib
    from tfadv.evaluation import faces as face_eval
    from tfadv.poisoning.scan import scan_faceset
    from tfadv.recipes.facenet import pretrained

    root = args.faces or (assets.require().demo_faces / "train")
    faceset = faces_lib.load_face_folder(root)
    model = pretrained(args.preset)
    face_eval.embed(model, faceset.images[:32])  # trace outside the timing
    times = {"scan": [], "forward": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = scan_faceset(model, faceset, args.method)
        times["scan"].append(time.perf_counter() - start)
        start = time.perf_counter()
        face_eval.embed(model, faceset.images)
        times["forward"].append(time.perf_counter() - start)
    n = len(faceset.labels)
    scan, forward = (n / statistics.median(times[k]) for k in ("scan", "forward"))
    ratio = scan / forward
    print(f"{n} photos, {args.method}: scan {scan:.1f} images/s, forward pass {forward:.1f} "
          f"images/s: {ratio:.2f} (target {TARGET:g}: {ratio / TARGET:.2f} of it); "
          f"flagged {result['flagged']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": n, "method": args.method, "scan_images_per_s": scan,
                       "forward_images_per_s": forward, "ratio": ratio, "target": TARGET,
                       "seconds": times}, f, indent=1)


if __name__ == "__main__":
    main()
