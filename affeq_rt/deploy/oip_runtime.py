"""The MLServer runtime behind ``affeq-rt serve``: one ONNX model through onnxruntime.

Kept apart from :mod:`affeq_rt.deploy.serve` because it subclasses MLServer's ``MLModel`` at import
time: MLServer (the ``serve`` extra) is imported only when a server really starts.
"""

from __future__ import annotations

import asyncio

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse

from affeq_rt.onnx.runtime import create_session

# ONNX Runtime tensor type → Open Inference Protocol datatype.
ORT_TO_OIP = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
              "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
              "tensor(int64)": "INT64", "tensor(bool)": "BOOL"}
OIP_TO_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8,
                "INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}



class OnnxRuntimeServing(MLModel):
    """MLServer runtime: one ONNX model through onnxruntime (``parameters.uri`` = the file,
    ``parameters.extra["provider"]`` = ``auto``/``cpu``/``cuda``/``tensorrt``)."""

    async def load(self) -> bool:
        """Create the session and record the input/output signatures."""
        params = self.settings.parameters
        provider = (params.extra or {}).get("provider", "auto") if params else "auto"
        self._sess = create_session(params.uri, provider=provider)
        self._inputs = {i.name: ORT_TO_OIP.get(i.type, "FP32")
                        for i in self._sess.session.get_inputs()}
        self._outputs = self._sess.output_names
        self.ready = True
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Decode the inputs (shape and datatype checked), run, encode the requested outputs."""
        feeds: dict[str, np.ndarray] = {}
        for inp in payload.inputs:
            want = self._inputs.get(inp.name)
            if want is None:
                raise MLServerError(f"unknown input {inp.name!r}; this model takes "
                                    f"{sorted(self._inputs)}", status_code=400)
            if inp.datatype != want:
                raise MLServerError(f"input {inp.name!r} is {inp.datatype}, the model takes "
                                    f"{want}", status_code=400)
            feeds[inp.name] = np.ascontiguousarray(NumpyCodec.decode_input(inp),
                                                   OIP_TO_NUMPY[want])
        missing = set(self._inputs) - set(feeds)
        if missing:
            raise MLServerError(f"missing input(s) {sorted(missing)}", status_code=400)
        names = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise MLServerError(f"unknown output(s) {unknown}; the model gives {self._outputs}",
                                status_code=400)
        try:
            results = await asyncio.to_thread(self._sess.session.run, names, feeds)
        except Exception as e:  # onnxruntime's InvalidArgument / Fail on bad shapes
            raise MLServerError(f"inference failed: {e}", status_code=400) from None
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(n, np.asarray(r))
                     for n, r in zip(names, results, strict=True)],
        )
