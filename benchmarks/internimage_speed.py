"""InternImage-T's two DCNv3 cores against timm's convnext_tiny and davit_tiny: images per second.

Usage: python benchmarks/internimage_speed.py [--threads 1] [--size 224] [--batch-size 2] [--steps 2]
       [--repeats 2] [--models internimage_t:grid_sample,internimage_t:deform_conv2d,convnext_tiny,davit_tiny]

Each model has random weights (pretrained=False, 3 classes) and runs as rockcls trains on the CPU:
channels-last tensors, the tuned allocator (``rockcls.training.device``), AdamW. Per round and
model: one warm-up step, ``--steps`` timed training steps (forward, backward, optimizer step) on
one random batch, then one warm-up and ``--steps`` timed forward passes in eval mode under
``inference_mode``. The models alternate within each round and each keeps its best of
``--repeats`` rounds, so load from other jobs on the machine hurts them alike.

Prints a table, then ``<model>[_<core>]_<size>_<train|eval> N`` lines (images per second).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = "internimage_t:grid_sample,internimage_t:deform_conv2d,convnext_tiny,davit_tiny"


class Subject:
    """One model on one batch, with its optimizer: built once, timed once per round."""

    def __init__(self, spec: str, size: int, batch_size: int) -> None:
        import torch

        from rockcls.training import internimage  # noqa: F401  (registers the InternImage names)
        from rockcls.training.models import build_model

        self.backbone, _, self.core = spec.partition(":")
        self.name = f"{self.backbone}_{self.core}" if self.core else self.backbone
        torch.manual_seed(0)
        model = build_model(self.backbone, 3, pretrained=False)
        if self.core:
            model.set_core_op(self.core)
        self.model = model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 3, (batch_size,))

    def train_rate(self, steps: int) -> float:
        import torch

        self.model.train()
        for step in range(1 + steps):
            if step == 1:
                start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return steps * len(self.x) / (time.perf_counter() - start)

    def eval_rate(self, steps: int) -> float:
        import torch

        self.model.eval()
        with torch.inference_mode():
            self.model(self.x)
            start = time.perf_counter()
            for _ in range(steps):
                self.model(self.x)
        return steps * len(self.x) / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: on the shared 2-core machine two threads wait on each other)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="backbone[:core_op], comma-separated")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from rockcls.training.device import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    subjects = [Subject(spec, args.size, args.batch_size) for spec in args.models.split(",")]
    best = {(s.name, phase): 0.0 for s in subjects for phase in ("train", "eval")}
    for _ in range(args.repeats):
        for s in subjects:
            best[(s.name, "train")] = max(best[(s.name, "train")], s.train_rate(args.steps))
            best[(s.name, "eval")] = max(best[(s.name, "eval")], s.eval_rate(args.steps))
    print(f"{args.size} px, batch {args.batch_size}, {args.threads} threads, best of {args.repeats}")
    print(f"{'model':<30} {'train img/s':>12} {'eval img/s':>12}")
    for s in subjects:
        print(f"{s.name:<30} {best[(s.name, 'train')]:>12.2f} {best[(s.name, 'eval')]:>12.2f}")
    for (name, phase), rate in best.items():
        print(f"{name}_{args.size}_{phase} {rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
