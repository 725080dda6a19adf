"""`rockcls prepare`: decode a dataset once into the cache before training (on the machine that has the data), so train runs only read pixels."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from rockcls.core.config import TrainConfig, add_config_arguments, build_config, option, option_of
from rockcls.data.cache import ImageCache, cache_settings, open_cache
from rockcls.data.index import index_dataset
from rockcls.data.sources import validate_images


@dataclass
class PrepareConfig:
    """Parameters of ``rockcls prepare``; defaults match training's, so train finds the cache."""

    data: str = option_of(TrainConfig, "data")
    img_size: int = option(224, "training resolution the cache is for (pixels)", min=16)
    cache_size: int = option_of(TrainConfig, "cache_size")
    cache_dir: str = option_of(TrainConfig, "cache_dir")
    workers: int = option(4, "decoding threads", min=1)
    skip_bad_images: bool = option_of(TrainConfig, "skip_bad_images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rockcls prepare",
        description="Index and validate a dataset and cache its decoded, resized images for training.")
    add_config_arguments(parser, PrepareConfig)
    return parser


def prepare(cfg: PrepareConfig) -> tuple[ImageCache, int, bool]:
    """Validate and cache ``cfg.data``: (cache, number of skipped files, whether it was built now)."""
    settings = cache_settings(img_size=cfg.img_size, cache_size=cfg.cache_size, cache_dir=cfg.cache_dir,
                              workers=cfg.workers)
    before = set((settings.folder / "images").glob("*.npz"))
    index = validate_images(index_dataset(cfg.data, check=False), skip_bad=cfg.skip_bad_images,
                            cache_dir=settings.folder, workers=settings.workers, cache_size=settings.size)
    cache = open_cache(index.paths, cache_dir=settings.folder, size=settings.size, workers=settings.workers)
    return cache, len(index.skipped), cache.data_path.with_suffix(".npz") not in before


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    cfg = build_config(PrepareConfig, vars(ns))
    start = time.perf_counter()
    cache, skipped, built_now = prepare(cfg)
    state = "built" if built_now else "already up to date"
    print(f"prepare: {len(cache)} images cached at {cache.size} px ({skipped} skipped), "
          f"{cache.nbytes / 1e6:.1f} MB, {state} in {time.perf_counter() - start:.1f} s: {cache.data_path}")
    return 0


if __name__ == "__main__":
    import sys

    from rockcls.core.entry import run_command

    sys.exit(run_command(main, sys.argv[1:]))
