"""Prompts of an RL run: the training prompts (a prompt file or the TFDS train split, optionally
category-balanced), the evaluation prompts, and the one-line PromptFileError the entry point reports."""

from __future__ import annotations

from ng_jax.data.prompts import category_of
from ng_jax.data.sources import as_text, read_prompt_file, read_prompt_metadata
from ng_jax.data.tfds_shapes import load_prompts
from ng_jax.errors import UserError, one_line
from ng_jax.models.stack import TOY, model_family


class PromptFileError(UserError, ValueError):
    """A prompt file (or prompt data set) that cannot be used; reported in one line by the entry point."""


def read_prompts(what: str, read) -> list[str]:
    try:
        return read()
    except (OSError, ValueError) as err:  # missing file, empty file, unparseable line, unprepared TFDS
        raise PromptFileError(f"{what}: {one_line(err)}") from None


def load_rl_prompts(config) -> list[str]:
    """Training prompts: `data.prompt_file` if set, else the TFDS train split (PromptFileError if unusable).
    Toy-world prompt files must parse in the shapes grammar; real models take free-form prompts."""
    def read():
        if config.data.get("prompt_file"):
            return read_prompt_file(config.data.prompt_file, shapes_grammar=model_family(config) == TOY)
        source = load_prompts(config.data.data_dir, "train")
        prompts = [as_text(source[i]["prompt"]) for i in range(len(source))]
        return balance_categories(prompts) if config.data.get("balance_categories", False) else prompts

    what = (f"data.prompt_file={config.data.prompt_file!r}" if config.data.get("prompt_file")
            else f"training prompts in data.data_dir={config.data.data_dir!r}")
    return read_prompts(what, read)


def balance_categories(prompts: list[str]) -> list[str]:
    """Every prompt category as often as the largest: each category's prompts are cycled to that length
    (the shapes world has 10 single-object but 539 colour-attribution train prompts)."""
    by_cat: dict[str, list[str]] = {}
    for p in prompts:
        by_cat.setdefault(category_of(p), []).append(p)
    n = max(len(v) for v in by_cat.values())
    return [v[i % len(v)] for _, v in sorted(by_cat.items()) for i in range(n)]


def eval_prompts(eval_cfg, shapes_grammar: bool = True) -> list[str]:
    """`eval.prompt_file` (free-form prompts unless `shapes_grammar`), else the TFDS split; first num_prompts."""
    if eval_cfg.get("prompt_file"):
        prompts = read_prompt_file(eval_cfg.prompt_file, shapes_grammar=shapes_grammar)
    else:
        source = load_prompts(eval_cfg.data_dir, eval_cfg.get("split", "eval"))
        prompts = [as_text(source[i]["prompt"]) for i in range(len(source))]
    n = int(eval_cfg.get("num_prompts", 0) or 0)
    return prompts[:n] if n else prompts


def load_eval_prompts(config) -> list[str]:
    """The evaluation prompts of a run (PromptFileError if unusable)."""
    what = (f"eval.prompt_file={config.eval.prompt_file!r}" if config.eval.get("prompt_file")
            else f"evaluation prompts in eval.data_dir={config.eval.data_dir!r}")
    return read_prompts(what, lambda: eval_prompts(config.eval, shapes_grammar=model_family(config) == TOY))


def load_prompt_metadata(config) -> dict[str, dict]:
    """prompt -> metadata of the run's JSONL prompt files (`data.prompt_file`, `eval.prompt_file`), for rewards
    that use it (`WeightedRewards.metadata`); {} without JSONL files."""
    out: dict[str, dict] = {}
    for what, path in (("data.prompt_file", config.data.get("prompt_file")),
                       ("eval.prompt_file", config.eval.get("prompt_file"))):
        if path:
            for prompt, meta in read_prompts(f"{what}={path!r}", lambda p=path: read_prompt_metadata(p)).items():
                if out.get(prompt, meta) != meta:
                    raise PromptFileError(f"{what}={path!r}: prompt {prompt!r} has other metadata than in the "
                                          "other prompt file")
                out[prompt] = meta
    return out
