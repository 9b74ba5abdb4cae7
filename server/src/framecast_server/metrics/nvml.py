"""GPU utilization, memory and power through NVML, where pynvml is installed and a GPU answers.

Optional: the server does not depend on pynvml. Without it (or without an NVIDIA driver) no GPU
metric is exported and nothing fails.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class _GPUCollector(Collector):
    def __init__(self, nvml: Any, count: int) -> None:
        self._nvml = nvml
        self._count = count

    def collect(self) -> Iterable[Metric]:
        nvml = self._nvml
        util = GaugeMetricFamily(
            "framecast_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (0 to 1)",
            labels=["gpu"],
        )
        used = GaugeMetricFamily(
            "framecast_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "framecast_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"]
        )
        power = GaugeMetricFamily("framecast_gpu_power_watts", "GPU power draw", labels=["gpu"])
        for index in range(self._count):
            label = [str(index)]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                util.add_metric(label, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(label, float(memory.used))
                total.add_metric(label, float(memory.total))
                power.add_metric(label, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            except Exception as exc:  # a GPU that stops answering must not break the scrape
                logger.debug("NVML query of GPU %d failed: %s", index, exc)
        yield from (util, used, total, power)


def register_gpu_metrics(registry: CollectorRegistry) -> bool:
    """Add the GPU collector when pynvml and a driver are present; whether it was added."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:  # ImportError, or NVMLError without a driver: no GPU metrics
        logger.debug("no GPU metrics: %s", exc)
        return False
    if count < 1:
        return False
    registry.register(_GPUCollector(nvml, count))
    return True
