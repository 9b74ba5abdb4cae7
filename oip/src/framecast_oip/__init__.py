"""The Open Inference Protocol as Framecast speaks it, shared by the server and the bench.

The generated messages and stubs are in ``framecast_oip._proto`` (scripts/generate_protos.py,
from protos/inference/); their descriptors live in a pool of their own, so they import beside
Triton's client, which registers the same names. Below: the names of Framecast's model tensors
and of the classification extension's parameter. The server reads and writes the tensors in
``framecast_server.service.codecs.tensors``, the bench in ``framecast_bench.oip_codec``.
"""

from __future__ import annotations

__all__ = ["CLASSIFICATION", "INPUT_NAME", "OUTPUT_NAME"]

#: The model's one input: preprocessed RGB images, UINT8 [N, H, W, 3].
INPUT_NAME = "images"
#: The model's one output: FP32 [N, classes] probabilities.
OUTPUT_NAME = "probabilities"
#: The requested-output parameter of the classification extension: the top k classes.
CLASSIFICATION = "classification"
