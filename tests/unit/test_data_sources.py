"""TFDS builders (offline, no TensorFlow), prompt files and the resumable prompt / image streams."""
import importlib.util
import json
import sys

import numpy as np
import pytest

from ng_jax.data import prompts as P
from ng_jax.data import sources as S
from ng_jax.data import world as W

EPP, PPC = 2, 2  # tiny builds: 2 images for each of 2 prompts per category


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def image_text_train(tfds_dir):
    from ng_jax.data import tfds_shapes

    return tfds_shapes.load_image_text(tfds_dir, "train", examples_per_prompt=EPP, prompts_per_category=PPC)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# ------------------------------------------------------------------------------------------------ tfds


def test_tensorflow_is_not_installed_nor_imported(image_text_train):
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules
    assert len(image_text_train) > 0


def test_image_text_builder_reads_back_rendered_examples(image_text_train, tfds_dir):
    from ng_jax.data import tfds_shapes

    ds = image_text_train
    assert len(ds) == EPP * PPC * len(W.CATEGORIES)
    records = [ds[i] for i in range(len(ds))]
    counts = {}
    for r in records:
        prompt, category = _text(r["prompt"]), _text(r["category"])
        assert r["image"].dtype == np.uint8 and r["image"].shape == (32, 32, 3)
        assert P.category_of(prompt) == category and prompt in P.split_prompts(category, "train")
        expected = [W.render_prompt(prompt, tfds_shapes.image_seed(prompt, k))[0] for k in range(EPP)]
        assert any(np.array_equal(r["image"], e) for e in expected)
        counts[prompt] = counts.get(prompt, 0) + 1
    assert set(counts.values()) == {EPP} and len(counts) == PPC * len(W.CATEGORIES)
    again = tfds_shapes.load_image_text(tfds_dir, "train", examples_per_prompt=EPP, prompts_per_category=PPC)
    assert all(np.array_equal(again[i]["image"], records[i]["image"]) for i in range(len(again)))
    test = tfds_shapes.load_image_text(tfds_dir, "test", examples_per_prompt=EPP, prompts_per_category=PPC)
    assert not {_text(test[i]["prompt"]) for i in range(len(test))} & set(counts)
    with pytest.raises(ValueError, match="unknown split 'eval'"):
        tfds_shapes.load_image_text(tfds_dir, "eval", examples_per_prompt=EPP, prompts_per_category=PPC)
    with pytest.raises(ValueError, match="examples_per_prompt must be an integer >= 1"):
        tfds_shapes.load_image_text(tfds_dir, "train", examples_per_prompt=0)


def test_prompts_builder_splits(tfds_dir):
    from ng_jax.data import tfds_shapes

    cats = ("colors", "position")
    loaded = {s: tfds_shapes.load_prompts(tfds_dir, s, categories=cats, eval_per_category=2)
              for s in ("train", "test", "eval")}
    pairs = {s: {(_text(ds[i]["category"]), _text(ds[i]["prompt"])) for i in range(len(ds))}
             for s, ds in loaded.items()}
    assert pairs["train"] == set(P.prompts_for("train", cats))
    assert pairs["test"] == set(P.prompts_for("test", cats))
    assert pairs["eval"] == set(P.eval_prompts(2, cats)) and pairs["eval"] <= pairs["test"]
    assert sorted(c for c, _ in pairs["eval"]) == ["colors", "colors", "position", "position"]


_PREPARE_AT_ONCE = """
import sys, time
from ng_jax.data import tfds_shapes
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both processes ask at the same moment
ds = tfds_shapes.load_prompts(sys.argv[1], "eval", categories=("colors",), eval_per_category=2)
print("eval prompts:", len(ds))
"""


def test_processes_started_at_once_prepare_a_dataset_once(tmp_path):
    """The grid's workers start together on a fresh data_dir: one prepares the dataset, the other waits
    and reads it (without the lock the second failed to rename its own copy into place)."""
    import os
    import subprocess
    import time

    start = f"{time.time() + 12:.3f}"  # after both have imported
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_AT_ONCE, str(tmp_path), start], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("eval prompts: 2" in o for o in outs), outs
    assert sum(o.count("preparing shapes_prompts") for o in outs) == 1, outs


# ------------------------------------------------------------------------------------------ prompt files


def test_read_text_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\na red circle\n  Three squares.  \n# done\n")
    assert S.read_prompt_file(path) == ["a red circle", "Three squares."]


def test_read_jsonl_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a red circle", "category": "colors"}, {"prompt": "a cross above a square"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert S.read_prompt_file(path) == ["a red circle", "a cross above a square"]
    sniffed = tmp_path / "prompts.txt"  # JSONL content is recognised without the suffix
    sniffed.write_text(json.dumps(lines[0]) + "\n")
    assert S.read_prompt_file(sniffed) == ["a red circle"]


@pytest.mark.parametrize("name, content, error, fragment", [
    ("empty.txt", "\n# nothing\n\n", ValueError, "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a red circle"}\n{"prompt": "a blue\n', ValueError, "bad.jsonl:2: not valid JSON"),
    ("nokey.jsonl", '{"prompt": "a red circle"}\n\n{"text": "a circle"}\n', ValueError,
     'nokey.jsonl:3: expected a JSON object with a "prompt" key'),
    ("cat.jsonl", '{"prompt": "a red circle", "category": "counting"}\n', ValueError, "whose category is 'colors'"),
    ("grammar.txt", "a red circle\n# c\na red hexagon\n", W.PromptError,
     "grammar.txt:3: cannot parse prompt 'a red hexagon'"),
])
def test_prompt_file_errors(tmp_path, name, content, error, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error) as info:
        S.read_prompt_file(path)
    assert fragment in str(info.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.read_prompt_file(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------------------------- streams


def test_prompt_stream_epochs_and_resume():
    prompts = P.split_prompts("colors", "train")
    stream = S.PromptStream(prompts, seed=7)
    first_epoch = stream.next_batch(len(prompts))
    assert sorted(first_epoch) == sorted(prompts) and first_epoch != prompts and stream.epoch == 1
    second_epoch = stream.next_batch(len(prompts))
    assert sorted(second_epoch) == sorted(prompts) and second_epoch != first_epoch

    stream.next_batch(5)
    saved = json.loads(json.dumps(stream.state()))  # a state survives JSON
    expected = [stream.next_batch(n) for n in (3, 11, len(prompts), 1)]  # crosses an epoch boundary
    resumed = S.PromptStream(prompts, seed=7)
    resumed.restore(saved)
    assert [resumed.next_batch(n) for n in (3, 11, len(prompts), 1)] == expected

    replay = S.PromptStream(prompts, seed=7)
    assert replay.next_batch(len(prompts)) == first_epoch
    assert S.PromptStream(prompts, seed=8).next_batch(len(prompts)) != first_epoch


def test_prompt_stream_rejects_mismatched_state_and_bad_input():
    stream = S.PromptStream(["a circle", "a square"], seed=0)
    with pytest.raises(ValueError, match="saved with fingerprint"):
        S.PromptStream(["a circle", "a cross"], seed=0).restore(stream.state())
    with pytest.raises(ValueError, match="saved with seed=0"):
        S.PromptStream(["a circle", "a square"], seed=1).restore(stream.state())
    with pytest.raises(ValueError, match="lacks \\['position'\\]"):
        stream.restore({"epoch": 0})
    with pytest.raises(ValueError, match="at least one prompt"):
        S.PromptStream([])
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        stream.next_batch(0)


def test_image_text_stream_batches_and_resume(image_text_train):
    stream = S.ImageTextStream(image_text_train, batch_size=5, seed=3)
    n = len(image_text_train)
    batches = [stream.next_batch() for _ in range(n // 5)]
    assert batches[0]["image"].shape == (5, 32, 32, 3) and batches[0]["image"].dtype == np.uint8
    assert all(isinstance(p, str) for p in batches[0]["prompt"])
    assert all(len(b["prompt"]) == 5 and len(set(b["prompt"])) >= 3 for b in batches)  # shuffled, not grouped
    saved = stream.state()
    expected = [stream.next_batch() for _ in range(4)]
    resumed = S.ImageTextStream(image_text_train, batch_size=5, seed=3)
    resumed.restore(saved)
    got = [resumed.next_batch() for _ in range(4)]
    for a, b in zip(expected, got):
        assert a["prompt"] == b["prompt"] and np.array_equal(a["image"], b["image"])


def test_image_text_stream_visits_every_record_once_per_epoch():
    records = [{"image": np.full((32, 32, 3), i, np.uint8), "prompt": f"p{i}".encode()} for i in range(7)]
    stream = S.ImageTextStream(records, batch_size=7, seed=0)
    for _ in range(2):
        batch = stream.next_batch()
        assert sorted(batch["image"][:, 0, 0, 0].tolist()) == list(range(7))
        assert [f"p{v}" for v in batch["image"][:, 0, 0, 0]] == batch["prompt"]
    with pytest.raises(ValueError, match="need an 'image' field"):
        S.ImageTextStream([{"prompt": "x"}], batch_size=1).next_batch()
