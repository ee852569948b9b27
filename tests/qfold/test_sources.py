"""Model and data sources: files, image folders, factories, and their errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qfold.examples import weights_path
from qfold.inputs import sources as sources


def test_image_folder_gives_float_images_and_class_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y = sources.load_data(str(tmp_path))
    assert x.shape == (6, 3, 6, 5) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(Image.open(tmp_path / "cat" / "0.png")).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(x[0].numpy(), first, atol=1e-7)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="contains no images"):
        sources.load_data(str(tmp_path))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="different shapes"):
        sources.load_data(str(tmp_path))


def test_array_files_and_their_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 2), np.float32), y=np.arange(4))
    x, y = sources.load_data(str(tmp_path / "d.npz"))
    assert x.shape == (4, 2) and y.tolist() == [0, 1, 2, 3]
    np.save(tmp_path / "plain.npy", np.ones((3, 1), np.float64))
    x, y = sources.load_data(str(tmp_path / "plain.npy"))
    assert x.dtype == torch.float32 and y is None
    np.savez(tmp_path / "mismatch.npz", x=np.ones((4, 2), np.float32), y=np.arange(3))
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        sources.load_data(str(tmp_path / "mismatch.npz"))
    (tmp_path / "bad.npz").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable .npy/.npz"):
        sources.load_data(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="expected a .npy/.npz file, an image folder"):
        sources.load_data(str(tmp_path / "nothing.csv"))


def test_model_factory_checkpoint_and_errors(tmp_path):
    model = sources.load_model("qfold.examples.models:ResNet", weights_path("resnet"))
    assert not model.training
    ref = torch.load(weights_path("resnet"), weights_only=True)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        sources.load_model("qfold.examples.models:Nope")
    with pytest.raises(ValueError, match="does not fit model"):
        sources.load_model("qfold.examples.models:DenseNet", weights_path("resnet"))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable torch state_dict"):
        sources.load_model("qfold.examples.models:ResNet", tmp_path / "bad.pt")
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        sources.load_model("qfold.examples:load_data")


def test_the_built_in_examples_splits_are_data_specs():
    from qfold.examples import load_data as example_data
    from qfold.inputs.sources import load_data

    x, y = load_data("example:test")
    ex, ey = example_data("test")
    assert torch.equal(x, ex) and torch.equal(y, ey) and x.shape == (1000, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        load_data("example:train")
