"""Running a trained generator: ``test`` (a dataset split, with ground truth) and ``predict`` (any images).

By default the generator runs as in the paper's test protocol: in train() mode, so BatchNorm normalises
with the test batch's statistics and dropout stays on. ``--eval`` uses the running statistics and no
dropout instead. Train mode updates the BatchNorm running statistics of the in-memory model; that model
is never saved here, so nothing leaks into a checkpoint.

``--engine`` chooses what computes the generator (:mod:`fastpix2pix.inference.engines`): ``torch`` (default)
the fastest native path measured, ``onnxruntime`` the network exported to ONNX in an ONNX Runtime session;
``--precision`` what it computes in (fp32, bf16, or auto: bf16 where the CPU computes it faster). The first
line either command prints names the engine and the precision, and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fastpix2pix.data import (
    AlignedDataset,
    DataOptions,
    check_size_for_generator,
    is_image_file,
    list_images,
    read_image,
    save_image,
    to_channels,
    to_tensor,
)
from fastpix2pix.data.synthetic import resolve_data_source
from fastpix2pix.inference.engines import Engine, build_engine
from fastpix2pix.inference.loading import TEST_SEED, load, load_generator, set_inference_mode
from fastpix2pix.inference.translate import pad_for
from fastpix2pix.models.size import SizeRule, size_multiple, size_rule
from fastpix2pix.runs.options import PredictOptions, TestOptions, default_of
from fastpix2pix.runs.visualize import HtmlPage, resize_for_aspect_ratio, tensor_to_image
from fastpix2pix.runtime import resolve_device, seed_everything

__all__ = ["TestResult", "evaluate_l1", "load_engine", "predict", "run_test"]


@dataclass
class TestResult:
    __test__ = False  # not a pytest test class
    images: int
    l1: float  # mean |fake_B - real_B| with images in [-1, 1]
    folder: Path
    index_html: Path


# --- test -------------------------------------------------------------------------------------------


def _test_dataset(opt: TestOptions) -> Any:
    # As the official test: no flip, no shuffling, and load_size = crop_size (resize without a crop).
    load_size = opt.crop_size if opt.load_size == default_of(TestOptions, "load_size") else opt.load_size
    options = DataOptions(
        direction=opt.direction,
        preprocess=opt.preprocess,
        load_size=max(load_size, opt.crop_size) if "crop" in opt.preprocess else load_size,
        crop_size=opt.crop_size,
        no_flip=True,
        input_nc=opt.input_nc,
        output_nc=opt.output_nc,
        max_dataset_size=opt.max_dataset_size,
        serial_batches=True,
        seed=opt.seed if opt.seed is not None else TEST_SEED,
    )
    dataset = AlignedDataset(opt.dataroot, opt.phase, options)
    if opt.num_test is not None:
        dataset = Subset(dataset, range(min(opt.num_test, len(dataset))))
    return dataset


def _check_size(dataset: Any, G: nn.Module) -> None:
    sample = dataset[0]["A"]
    check_size_for_generator(sample.shape[-2], sample.shape[-1], size_multiple(G))


def _batches(
    G: nn.Module | Engine, loader: DataLoader, device: torch.device
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    with torch.no_grad():
        for batch in loader:
            real_A = batch["A"].to(device, non_blocking=True)
            yield batch, G(real_A)


def evaluate_l1(G: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Mean |G(A) - B| over a loader's images (in [-1, 1] units), in G's current train/eval mode."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for batch, fake_B in _batches(G, loader, device):
        real_B = batch["B"].to(device)
        total += (fake_B.float() - real_B).abs().mean(dim=(1, 2, 3)).sum().double()
        count += real_B.shape[0]
    return float(total) / max(count, 1)


def split_loader(opt: TestOptions, G: nn.Module) -> DataLoader:
    """The test split as the official test reads it (see :func:`_test_dataset`), size-checked for G."""
    dataset = _test_dataset(opt)
    if len(dataset) == 0:
        raise FileNotFoundError(f"no test images in {opt.dataroot}/{opt.phase}")
    _check_size(dataset, G)
    return DataLoader(dataset, batch_size=opt.batch_size, shuffle=False, num_workers=opt.num_threads)


def run_test(opt: TestOptions, *, say: Any = print) -> TestResult:
    """Run the test split through the generator; write images, ``index.html`` and ``metrics.json``."""
    device = resolve_device(opt.device)
    G, opt, source = load_generator(opt, device)
    dataroot, direction = resolve_data_source(opt.dataroot, opt.direction)
    opt = dataclasses.replace(opt, dataroot=str(dataroot), direction=direction)
    seed = opt.seed if opt.seed is not None else TEST_SEED
    seed_everything(seed)
    loader = split_loader(opt, G)
    set_inference_mode(G, opt.eval)
    engine = build_engine(
        G, opt.engine, eval_mode=opt.eval, device=device, seed=seed, batch_size=opt.batch_size,
        precision=opt.precision,
    )  # fmt: skip
    say(f"test: {source} on {device}, {engine.describe()}")

    folder = Path(opt.results_dir) / opt.name / f"{opt.phase}_{opt.epoch}"
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    page = HtmlPage(f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {opt.epoch}")
    total_l1, count = 0.0, 0
    for batch, fake_B in _batches(engine, loader, device):
        real_B = batch["B"]
        per_image = (fake_B.float().cpu() - real_B).abs().mean(dim=(1, 2, 3))
        for i, path in enumerate(batch["A_paths"]):
            stem = Path(path).stem
            visuals = {"real_A": batch["A"][i], "fake_B": fake_B[i], "real_B": real_B[i]}
            entries = []
            for label, tensor in visuals.items():
                name = f"{stem}_{label}.png"
                _save(image_dir / name, resize_for_aspect_ratio(tensor_to_image(tensor), opt.aspect_ratio))
                entries.append((f"images/{name}", label))
            page.header(stem)
            page.images(entries)
        total_l1 += float(per_image.sum())
        count += len(per_image)
    l1 = total_l1 / max(count, 1)
    mode = (
        "eval (running statistics, no dropout)" if opt.eval else "train mode (batch statistics, dropout on)"
    )
    precision = engine.precision.name
    page.paragraph(
        f"{count} images from {opt.dataroot}/{opt.phase}; weights {source}; {mode}; engine {opt.engine}, "
        f"{precision}; L1 {l1:.4f}"
    )
    index = page.save(folder / "index.html")
    metrics = {
        "images": count, "l1": l1, "weights": source, "mode": mode, "epoch": opt.epoch, "engine": opt.engine,
        "precision": precision, "precision_reason": engine.precision.reason,
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    say(
        f"tested {count} images with {source} ({mode}, engine {opt.engine}, {precision}): L1 {l1:.4f}; "
        f"page {index}"
    )
    return TestResult(count, l1, folder, index)


def _save(path: Path, image: Any) -> None:
    save_image(path, image)


def _output_paths(inputs: list[Path], opt: PredictOptions) -> list[Path]:
    single_file = Path(opt.input).is_file()
    if single_file and opt.output and is_image_file(opt.output):
        return [Path(opt.output)]
    folder = Path(opt.output) if opt.output else Path(opt.results_dir) / opt.name / "predict"
    return [folder / f"{p.stem}.png" for p in inputs]


def predict(opt: PredictOptions, *, say: Any = print) -> list[Path]:
    """Translate ``opt.input`` (an image or a folder) and write the outputs; returns their paths.

    Under ``--eval``, consecutive images of the same padded size go through the engine together, up to
    ``--batch_size``; under the paper's protocol each image is its own batch (its own statistics).
    """
    if not opt.input:
        raise ValueError("predict needs --input: an image file or a folder of images")
    source_path = Path(opt.input)
    if not source_path.exists():
        raise FileNotFoundError(f"--input {source_path} does not exist")
    if opt.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {opt.batch_size}")
    device = resolve_device(opt.device)
    G, opt, source = load_generator(opt, device)
    seed = opt.seed if opt.seed is not None else TEST_SEED
    seed_everything(seed)
    set_inference_mode(G, opt.eval)
    batch_size = opt.batch_size if opt.eval else 1
    engine = build_engine(
        G, opt.engine, eval_mode=opt.eval, device=device, seed=seed, batch_size=batch_size,
        precision=opt.precision,
    )  # fmt: skip
    say(f"predict: {source} on {device}, {engine.describe()}")
    inputs = [source_path] if source_path.is_file() else list_images(source_path)
    outputs = _output_paths(inputs, opt)
    sizes = size_rule(G)
    for group in _same_size_groups(inputs, outputs, opt.input_nc, sizes, batch_size, device):
        _translate_group(engine, group, sizes)
    where = outputs[0].parent if len(outputs) > 1 else outputs[0]
    precision = engine.precision.name
    say(f"wrote {len(outputs)} image(s) with {source} (engine {opt.engine}, {precision}) to {where}")
    return outputs


def load_engine(
    source: str | os.PathLike[str],
    *,
    epoch: str | int = "latest",
    device: str = "auto",
    eval_mode: bool = False,
    engine: str = "torch",
    precision: str = "fp32",
    seed: int = TEST_SEED,
    batch_size: int = 1,
    **architecture: Any,
) -> Engine:
    """A trained generator as ``fastpix2pix predict`` runs it: loaded as :func:`load` loads it (a run folder
    or an official ``*_net_G.pth``), built into ``engine`` computing in ``precision`` (``fp32``, ``bf16``
    or ``auto``: bf16 where this CPU computes it faster than float32; see ``engine.precision``).
    ``translate`` and ``translate_image`` take it as they take the network. ``seed`` seeds the
    onnxruntime engine's dropout (the torch engine draws from torch's generator, as ``G`` does)."""
    G = load(source, epoch=epoch, device=device, eval_mode=eval_mode, **architecture)
    return build_engine(
        G, engine, eval_mode=eval_mode, device=next(G.parameters()).device, seed=seed,
        batch_size=batch_size, precision=precision,
    )  # fmt: skip


def _same_size_groups(
    inputs: list[Path],
    outputs: list[Path],
    channels: int,
    sizes: SizeRule,
    batch_size: int,
    device: torch.device,
) -> Iterator[list[tuple[torch.Tensor, Path]]]:
    """Consecutive (image, output path) pairs whose padded sizes agree, ``batch_size`` at most per group;
    images are read as the groups are consumed (a folder is never held in memory at once)."""
    group: list[tuple[torch.Tensor, Path]] = []
    for path, out in zip(inputs, outputs, strict=True):
        image = to_tensor(to_channels(read_image(path), channels)).to(device)
        if group and (
            len(group) == batch_size
            or sizes.padded(*group[0][0].shape[-2:]) != sizes.padded(*image.shape[-2:])
        ):
            yield group
            group = []
        group.append((image, out))
    if group:
        yield group


def _translate_group(engine: Engine, group: list[tuple[torch.Tensor, Path]], sizes: SizeRule) -> None:
    """One batch through the engine: every image padded (reflect), the outputs cropped back and saved."""
    padded, originals = zip(*(pad_for(image.unsqueeze(0), sizes) for image, _ in group), strict=True)
    with torch.no_grad():
        fakes = engine(torch.cat(padded))
    for fake, (height, width), (_, out) in zip(fakes, originals, group, strict=True):
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(out, tensor_to_image(fake[:, :height, :width]))
