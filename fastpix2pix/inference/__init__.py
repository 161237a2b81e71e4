"""Running a trained generator: loading it, translating images of any size, testing, exporting.

    from fastpix2pix.inference import load, translate_image

    G = load("checkpoints/facades")                 # a run folder, or an official *_net_G.pth
    photo = translate_image(G, labels)              # (H, W, 3) uint8 in, (H, W, 3) uint8 out, any size

    engine = load_engine("checkpoints/facades", eval_mode=True, precision="auto")  # as `predict` runs it
    photo = translate_image(engine, labels)         # in bf16 where this CPU computes it faster

Images are padded to the sizes the generator takes and the output cropped back: the rule of
``fastpix2pix predict`` and ``serve`` (:mod:`fastpix2pix.models.size`).
"""

from fastpix2pix.inference.deploy_net import deploy_network
from fastpix2pix.inference.engines import Engine, Precision, build_engine, resolve_precision
from fastpix2pix.inference.export import export_generator
from fastpix2pix.inference.loading import load, load_generator, set_inference_mode
from fastpix2pix.inference.run import TestResult, load_engine, predict, run_test
from fastpix2pix.inference.translate import pad_to_multiple, predict_image, translate, translate_image

__all__ = [
    "Engine",
    "Precision",
    "TestResult",
    "build_engine",
    "deploy_network",
    "export_generator",
    "load",
    "load_engine",
    "load_generator",
    "pad_to_multiple",
    "predict",
    "predict_image",
    "resolve_precision",
    "run_test",
    "set_inference_mode",
    "translate",
    "translate_image",
]
