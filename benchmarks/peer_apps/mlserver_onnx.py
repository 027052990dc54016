"""MLServer peer: a custom MLModel around an onnxruntime session (1 intra-op thread).

Runs inside build/peers/mlserver-venv, never imports edged. model-settings.json
names it as ``mlserver_onnx.OnnxModel`` with ``parameters.uri`` = the .onnx file.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    """Decodes each V2 input with NumpyCodec, runs the session, encodes every output."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        uri = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(uri, sess_options=options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {item.name: NumpyCodec.decode_input(item) for item in payload.inputs}
        results = self._session.run(self._output_names, feed)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._output_names, results)],
        )
