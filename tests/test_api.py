"""The Python API: the README's "From Python" example run as written, and what it promises."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastpix2pix.data import read_image
from fastpix2pix.inference import load, translate_image
from fastpix2pix.inference.run import predict
from fastpix2pix.runs.options import PredictOptions

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## From Python") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's From Python section has no python block"
    return match.group(1)


@pytest.mark.slow  # trains a small U-Net for one epoch (seconds on 2 cores)
def test_the_readme_example_runs_and_translates_as_predict_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx", reason="the example exports to ONNX (the [export] extra)")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(readme_example(), "README.md (From Python)", "exec"), scope)
    photo, labels = scope["photo"], scope["labels"]
    assert isinstance(photo, np.ndarray) and photo.shape == (100, 90, 3) and photo.dtype == np.uint8
    assert (tmp_path / "mine.onnx").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "mine" / "latest.pt").is_file()

    # `fastpix2pix predict --eval` on the same 100x90 crop: the same padding and crop, the same network
    # (its engine folds BatchNorm into the convolutions: float32 rounding may move a pixel by one level).
    crop, out = tmp_path / "crop.png", tmp_path / "predicted.png"
    Image.fromarray(labels[:100, :90]).save(crop)
    opt = PredictOptions(name="mine", input=str(crop), output=str(out), device="cpu", eval=True)
    predict(opt, say=lambda _: None)
    G = load(tmp_path / "checkpoints" / "mine", device="cpu", eval_mode=True)
    ours, theirs = translate_image(G, labels[:100, :90]).astype(int), read_image(out).astype(int)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1


def test_load_names_what_it_cannot_find(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a run folder nor a generator file"):
        load(tmp_path / "nothing")
