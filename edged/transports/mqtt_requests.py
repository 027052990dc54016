"""Request handling of the MQTT transport: a request on ``{prefix}/{device}/infer/{model}``
decoded, run by the data plane, and its answer or error published to its reply topic.

``MqttRequests`` holds these steps for ``edged.transports.mqtt.MqttTransport``, which
sets the attributes they use.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import paho.mqtt.client as mqtt

from edged.dataplane import InferenceRequest
from edged.errors import EdgedError, InvalidInput
from edged.model_entry import ModelEntry
from edged.transports.mqtt_codec import (
    JSON_CONTENT_TYPE, RAW_CONTENT_TYPE, decode_raw, finish_properties, pack_fields, raw_parameters,
    reply_properties, response_topic_problem, user_properties,
)
from edged.v2 import decode_request, encode_response

if TYPE_CHECKING:
    from edged.config import MqttConfig
    from edged.dataplane import DataPlane
    from edged.transports.mqtt_codec import RawReplyFields

log = logging.getLogger("edged.transports.mqtt")  # the transport's own logger, as before the split

Answer = tuple[bytes, bytes]  # payload, packed Content Type and User Properties (mqtt_codec.pack_fields)
JSON_FIELDS = pack_fields(JSON_CONTENT_TYPE, [])
# A request's form, which its reply keeps: V2 JSON, or a raw tensor described by
# user properties or by its Content Type's parameters.
JSON_FORM, RAW_IN_USER_PROPERTIES, RAW_IN_CONTENT_TYPE = range(3)


@dataclass
class Reply:
    """Where a request's answer goes: its Response Topic (or the device's result
    topic) with its Correlation Data; ``problem`` says why the Response Topic was refused."""

    topic: str
    correlation: bytes | None
    problem: str | None


class MqttRequests:
    """The request steps of ``MqttTransport`` (a base class of it): on paho's network
    thread for a cheap model, else on a worker thread."""

    dataplane: DataPlane
    cfg: MqttConfig
    client: mqtt.Client
    base: str
    inline_max_us: float
    _raw_fields: RawReplyFields
    _publish_qos0: Callable[..., Any] | None
    _count_inline: Callable[[float], None]
    _submit: Callable[..., None]

    def _handle_request(self, message: mqtt.MQTTMessage, inline: bool) -> None:
        """Decode and answer one request. ``inline``: on paho's network thread, where a
        request runs to the end only if its model is cheap (DataPlane.runs_inline, the
        same rule HTTP uses on its event loop); others go on to a worker thread."""
        props = message.properties
        model = message.topic.rsplit("/", 1)[-1]
        reply = self._reply_to(message, model)

        def work() -> Answer | None:
            if reply.problem is not None:
                raise InvalidInput(f"request refused: {reply.problem}")
            content_type = getattr(props, "ContentType", None) or JSON_CONTENT_TYPE
            request, form, entry = self._decode(model, message.payload, content_type, user_properties(props))
            if inline and not self.dataplane.runs_inline(request, self.inline_max_us, entry):
                self._submit(self._answer, message.topic, reply, lambda: self._infer(request, form, entry))
                return None
            if inline:
                self._count_inline(1)
            return self._infer(request, form, entry)

        self._answer(message.topic, reply, work)

    def _reply_to(self, message: mqtt.MQTTMessage, model: str) -> Reply:
        fallback = f"{self.base}/result/{model}"
        response_topic = getattr(message.properties, "ResponseTopic", None)
        correlation = getattr(message.properties, "CorrelationData", None)
        problem = response_topic_problem(response_topic) if response_topic is not None else None
        if problem is not None:
            log.warning("MQTT request on %s refused: %s; error sent to %s", message.topic, problem, fallback)
            return Reply(fallback, correlation, problem)
        return Reply(response_topic or fallback, correlation, None)

    def _answer(self, request_topic: str, reply: Reply, work: Callable[[], Answer | None]) -> None:
        """Run ``work`` and publish its answer, or its error; None: handed on to a worker."""
        try:
            answer = work()
            if answer is None:
                return
        except EdgedError as exc:
            answer = self._error(exc.message, exc.code)
        except Exception:  # never let one message kill the loop; no exception text goes out
            log.exception("MQTT request on %s failed", request_topic)
            answer = self._error("internal error (details are in the device's log)", "internal")
        payload, fields = answer
        try:
            if self.cfg.qos == 0 and self._publish_qos0 is not None:
                self._publish_qos0(reply.topic, payload, finish_properties(fields, reply.correlation))
            else:
                self.client.publish(reply.topic, payload, qos=self.cfg.qos,
                                    properties=reply_properties(fields, reply.correlation))
        except (ValueError, TypeError) as exc:
            log.warning("MQTT reply to %s for %s could not be sent: %s", reply.topic, request_topic, exc)

    @staticmethod
    def _error(message: str, code: str) -> Answer:
        body = json.dumps({"error": message, "code": code}).encode()
        return body, pack_fields(JSON_CONTENT_TYPE, [("error_code", code)])

    def _decode(self, model: str, payload: bytes, content_type: str,
                user: dict[str, str]) -> tuple[InferenceRequest, int, ModelEntry]:
        """The request, its form (JSON_FORM, RAW_IN_USER_PROPERTIES or RAW_IN_CONTENT_TYPE)
        and the model version it goes to (found once, before a large body is decoded:
        ModelNotFound first). Tensor parameters of the Content Type and user properties
        may both describe a raw tensor; a user property wins over a parameter of its name."""
        form = RAW_IN_USER_PROPERTIES if content_type == RAW_CONTENT_TYPE else JSON_FORM
        params = raw_parameters(content_type) if form == JSON_FORM else None
        if params is not None:
            form = RAW_IN_CONTENT_TYPE
            user = {**params, **user}
        version = user.get("version") or None
        entry = self.dataplane.check_model(model, version)
        if form == JSON_FORM:
            return decode_request(model, version, payload, None).request, form, entry
        request = decode_raw(model, payload, user)
        if "" in request.inputs:
            specs = entry.model.bundle.manifest.inputs if entry.model is not None else []
            if len(specs) != 1:
                names = [spec.name for spec in specs]
                raise InvalidInput(f"model {model} has inputs {names}: set user property 'input'")
            request.inputs = {specs[0].name: request.inputs[""]}
        return request, form, entry

    def _infer(self, request: InferenceRequest, form: int, entry: ModelEntry) -> Answer:
        response = self.dataplane.infer(request, "mqtt", entry)
        if form == JSON_FORM:
            return encode_response(response, set(), False)[0], JSON_FIELDS
        name, array = next(iter(response.outputs.items()))
        fields = self._raw_fields.get(name, array.dtype, array.shape, response.version, form == RAW_IN_CONTENT_TYPE)
        return np.ascontiguousarray(array).tobytes(), fields
