"""The pretraining job end to end at a tiny size (its step, data stream and bundle: tests/unit/test_pretrain.py)."""

import json

import numpy as np
import pytest

from ng_jax import pretrain
from ng_jax.eval.grid import load_config_file
from ng_jax.models.bundle import load_bundle
from tests.fixtures import tiny_model_cfg, tiny_text_cfg


@pytest.mark.slow
def test_pretrain_job_exports_resumes_and_grows(tmp_path, capsys):
    """The pretraining job end to end at a tiny size: TFDS image-text data, logs, sample grid, export;
    a longer rerun resumes from the checkpoint; a deeper stage-2 run starts from the exported bundle."""
    c = load_config_file("pretrain_shapes.py")
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.images_per_category, c.data.prompts_per_category, c.data.batch_size = 8, 2, 8
    c.model, c.text = tiny_model_cfg(image_size=32, patch_size=8), tiny_text_cfg()
    c.optim.warmup_steps, c.optim.decay_steps = 2, 8
    c.train.steps, c.log_every, c.sample_every, c.ckpt.every = 4, 2, 4, 2
    c.sample.prompts, c.sample.num_steps = ("a red circle", "two blue squares"), 2
    one = str(tmp_path / "one")
    assert pretrain.run(c, one) == 0
    assert [json.loads(line)["step"] for line in open(f"{one}/metrics.jsonl")] == [2, 4]
    assert (tmp_path / "one" / "samples" / "step_000004.png").is_file()
    assert load_bundle(f"{one}/reference").info["trained_steps"] == 4
    c.train.steps = 6
    assert pretrain.run(c, one) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    first = load_bundle(f"{one}/reference")
    assert first.info["trained_steps"] == 6

    c.init_from = f"{one}/reference"
    c.model.depth, c.text.depth = c.model.depth + 1, c.text.depth + 1
    c.train.steps, c.export_dtype = 2, "float16"
    assert pretrain.run(c, str(tmp_path / "two")) == 0
    grown = load_bundle(str(tmp_path / "two" / "reference"))
    assert grown.info["init_from"] == dict(first.info, path=c.init_from)
    assert grown.model_cfg.depth == first.model_cfg.depth + 1
    # The trained embedders came along (moved by 2 optimizer steps, not re-initialised).
    a = np.asarray(first.params["text"]["token_embedding"]["embedding"])
    b = np.asarray(grown.params["text"]["token_embedding"]["embedding"])
    assert np.abs(b - a).max() < 0.1 * np.abs(a).max()
