"""tensorflow-datasets builders of the shapes world, prepared offline and read without TensorFlow.

Both builders write array_record files and are read through the random-access data-source API
(`builder.as_data_source(split)`), which needs no TensorFlow:

    ShapesImageText  image uint8 [32, 32, 3], prompt, category; splits train / test. Each prompt gets
                     `examples_per_prompt` images rendered from the seed stable_hash(f"{prompt}#{index}").
    ShapesPrompts    prompt, category; splits train / test / eval (eval: a fixed, category-balanced
                     subset of the test prompts, see prompts.eval_prompts).

    ds = load_image_text("/tmp/tfds", "train", examples_per_prompt=2)
    ds[0]["image"].shape, len(ds)
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ng_jax.data.prompts import eval_prompts, prompts_for, stable_hash
from ng_jax.data.world import CANVAS, CATEGORIES, render_prompt

VERSION = tfds.core.Version("1.0.0")
FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD
EVAL_PER_CATEGORY = 4


def image_seed(prompt: str, index: int) -> int:
    """The render seed of the `index`-th image of a prompt (stable across machines and runs)."""
    return stable_hash(f"{prompt}#{index}")


@tfds.core.utils.classproperty
@classmethod
def _this_file(cls) -> epath.Path:
    """`code_path` of the builders below. The inherited one reaches for the `importlib_resources`
    backport (only installed by tensorflow-datasets on Python < 3.9) for builders inside a package,
    so it fails on Python 3.11; the builders' code is this file."""
    return epath.Path(__file__)


def _check_categories(categories: Sequence[str]) -> tuple[str, ...]:
    if isinstance(categories, str) or not categories:
        raise ValueError(f"categories must be a non-empty sequence of names, got {categories!r}")
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown prompt category {c!r}; expected one of {CATEGORIES}")
    return tuple(categories)


def _limit(pairs: list[tuple[str, str]], prompts_per_category: int | None) -> list[tuple[str, str]]:
    """At most `prompts_per_category` prompts of each category (the smallest-hash ones), for tiny builds."""
    if prompts_per_category is None:
        return pairs
    out = []
    for c in dict.fromkeys(c for c, _ in pairs):
        chosen = sorted((p for cc, p in pairs if cc == c), key=stable_hash)[:prompts_per_category]
        out.extend((c, p) for p in sorted(chosen))
    return out


@dataclasses.dataclass
class ShapesImageTextConfig(tfds.core.BuilderConfig):
    """How many images per prompt, which categories, and (for tiny builds) how many prompts each."""

    examples_per_prompt: int = 4
    categories: tuple[str, ...] = CATEGORIES
    prompts_per_category: int | None = None


@dataclasses.dataclass
class ShapesPromptsConfig(tfds.core.BuilderConfig):
    """Which categories, how many eval prompts per category, and (for tiny builds) prompts per category."""

    categories: tuple[str, ...] = CATEGORIES
    eval_per_category: int = EVAL_PER_CATEGORY
    prompts_per_category: int | None = None


def image_text_config(examples_per_prompt: int = 4, categories: Sequence[str] = CATEGORIES,
                      prompts_per_category: int | None = None) -> ShapesImageTextConfig:
    """A ShapesImageText config whose name encodes its parameters (so builds never share a folder)."""
    if not isinstance(examples_per_prompt, int) or examples_per_prompt < 1:
        raise ValueError(f"examples_per_prompt must be an integer >= 1, got {examples_per_prompt!r}")
    if prompts_per_category is not None and prompts_per_category < 1:
        raise ValueError(f"prompts_per_category must be None or >= 1, got {prompts_per_category!r}")
    categories = _check_categories(categories)
    name = f"epp{examples_per_prompt}"
    if categories != CATEGORIES:
        name += "-" + "-".join(categories)
    if prompts_per_category is not None:
        name += f"-ppc{prompts_per_category}"
    return ShapesImageTextConfig(name=name, examples_per_prompt=examples_per_prompt, categories=categories,
                                 prompts_per_category=prompts_per_category)


def prompts_config(categories: Sequence[str] = CATEGORIES, eval_per_category: int = EVAL_PER_CATEGORY,
                   prompts_per_category: int | None = None) -> ShapesPromptsConfig:
    """A ShapesPrompts config whose name encodes its parameters."""
    if eval_per_category < 1:
        raise ValueError(f"eval_per_category must be >= 1, got {eval_per_category!r}")
    if prompts_per_category is not None and prompts_per_category < 1:
        raise ValueError(f"prompts_per_category must be None or >= 1, got {prompts_per_category!r}")
    categories = _check_categories(categories)
    name = f"eval{eval_per_category}"
    if categories != CATEGORIES:
        name += "-" + "-".join(categories)
    if prompts_per_category is not None:
        name += f"-ppc{prompts_per_category}"
    return ShapesPromptsConfig(name=name, categories=categories, eval_per_category=eval_per_category,
                               prompts_per_category=prompts_per_category)


class ShapesImageText(tfds.core.GeneratorBasedBuilder):
    """Rendered (image, prompt, category) examples of the shapes world; no download."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [image_text_config(4)]
    code_path = _this_file

    def __init__(self, *, config: ShapesImageTextConfig | str | None = None, **kwargs):
        super().__init__(config=config, file_format=FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="32x32 images of coloured shapes rendered from compositional prompts.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(CANVAS, CANVAS, 3), dtype=np.uint8),
                "prompt": tfds.features.Text(),
                "category": tfds.features.Text(),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is rendered locally
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        for category, prompt in _limit(prompts_for(split, cfg.categories), cfg.prompts_per_category):
            for index in range(cfg.examples_per_prompt):
                image, _ = render_prompt(prompt, image_seed(prompt, index))
                yield f"{prompt}#{index}", {"image": image, "prompt": prompt, "category": category}


class ShapesPrompts(tfds.core.GeneratorBasedBuilder):
    """Prompt-only (prompt, category) records for RL rollouts and evaluation; no download."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [prompts_config()]
    code_path = _this_file

    def __init__(self, *, config: ShapesPromptsConfig | str | None = None, **kwargs):
        super().__init__(config=config, file_format=FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Compositional prompts of the shapes world with their GenEval-like category.",
            features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(),
                                                 "category": tfds.features.Text()}),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test", "eval")}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        if split == "eval":
            pairs = eval_prompts(cfg.eval_per_category, cfg.categories)
        else:
            pairs = _limit(prompts_for(split, cfg.categories), cfg.prompts_per_category)
        for category, prompt in pairs:
            yield prompt, {"prompt": prompt, "category": category}


def _make_builder(builder_cls, data_dir: str, config: tfds.core.BuilderConfig) -> tfds.core.DatasetBuilder:
    """A builder for `config`, passed by name when it is one of the class's own configs (names encode
    every parameter, and tfds refuses a custom config named like a predefined one)."""
    predefined = {c.name for c in builder_cls.BUILDER_CONFIGS}
    return builder_cls(data_dir=data_dir, config=config.name if config.name in predefined else config)


@contextlib.contextmanager
def _exclusive(data_dir: str):
    """Held while one process prepares a dataset under a local `data_dir`: processes started at once (the
    grid's workers) would otherwise each prepare it and all but the first fail to rename their copy into
    place. A bucket (gs://...) has no file locks; there the processes must not start at once."""
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".prepare.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepared_source(builder_cls, data_dir: str, config: tfds.core.BuilderConfig, split: str,
                     splits: tuple[str, ...]):
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {builder_cls.name}; expected one of {splits}")
    builder = _make_builder(builder_cls, data_dir, config)
    if not builder.is_prepared():
        with _exclusive(data_dir):
            if builder.is_prepared():   # another process prepared it meanwhile: read its dataset info
                builder = _make_builder(builder_cls, data_dir, config)
            else:
                _prepare(builder)
    return builder.as_data_source(split)


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    print(f"preparing {builder.name}/{builder.builder_config.name} under {builder.data_dir} (once)", flush=True)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # tfds narrates every shard; one line above is enough
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare(file_format=FILE_FORMAT)
    finally:
        absl_logger.setLevel(level)
        tfds.enable_progress_bar()


def load_image_text(data_dir: str, split: str, examples_per_prompt: int = 4,
                    categories: Sequence[str] = CATEGORIES, prompts_per_category: int | None = None):
    """The random-access data source (len(), [i] -> {"image", "prompt", "category"}) of a split,
    preparing the dataset under `data_dir` on first use."""
    config = image_text_config(examples_per_prompt, categories, prompts_per_category)
    return _prepared_source(ShapesImageText, data_dir, config, split, ("train", "test"))


def load_prompts(data_dir: str, split: str, categories: Sequence[str] = CATEGORIES,
                 eval_per_category: int = EVAL_PER_CATEGORY, prompts_per_category: int | None = None):
    """The random-access data source ([i] -> {"prompt", "category"}) of the train, test or eval prompts,
    preparing the dataset under `data_dir` on first use."""
    config = prompts_config(categories, eval_per_category, prompts_per_category)
    return _prepared_source(ShapesPrompts, data_dir, config, split, ("train", "test", "eval"))

