"""Where the fast trainer's batches come from: the training set held on the device, or streamed."""

from fastpix2pix.data.sources.base import BatchSource
from fastpix2pix.data.sources.device import DeviceDataset
from fastpix2pix.data.sources.plan import DEFAULT_DEVICE_SHARE, SOURCE_POLICIES, plan_batch_source
from fastpix2pix.data.sources.streaming import StreamingDataset

__all__ = [
    "DEFAULT_DEVICE_SHARE",
    "SOURCE_POLICIES",
    "BatchSource",
    "DeviceDataset",
    "StreamingDataset",
    "plan_batch_source",
]
