"""Fixes for onnx2tf 2.6.9's flatbuffer_direct SavedModel exporter, applied by
``onnx_tf_worker.py`` inside build/tf-venv before it converts (the exporter
builds the float SavedModel that TensorFlow's converter then quantizes)."""

from __future__ import annotations

from typing import Any


def patch_onnx2tf() -> None:
    """onnx2tf 2.6.9's SavedModel exporter passes 4-element dilations to
    tf.nn.depthwise_conv2d, which takes 2 ([h, w]) and then fails on every
    depthwise convolution; give its kernel the 2-element form."""
    try:
        from onnx2tf.tflite_builder import saved_model_exporter as sme
    except ImportError:
        return
    original = sme._REGISTERED_KERNELS.get("DEPTHWISE_CONV_2D")  # noqa: SLF001
    if original is None or getattr(original, "_edged_patched", False):
        return
    import tensorflow as tf

    depthwise = tf.nn.depthwise_conv2d

    def fixed(executor: Any, op: Any, env: Any) -> None:
        def call(x: Any, w: Any, strides: Any, padding: Any, dilations: Any = None, **kw: Any) -> Any:
            if dilations is not None and len(dilations) == 4:
                dilations = list(dilations)[1:3]
            return depthwise(x, w, strides=strides, padding=padding, dilations=dilations, **kw)

        tf.nn.depthwise_conv2d = call
        try:
            original(executor, op, env)
        finally:
            tf.nn.depthwise_conv2d = depthwise

    fixed._edged_patched = True  # type: ignore[attr-defined]
    sme._REGISTERED_KERNELS["DEPTHWISE_CONV_2D"] = fixed  # noqa: SLF001

    # Recurrent ops (LSTM, GRU) carry their state in TFLite variable tensors without data,
    # which the exporter leaves unbound; TFLite starts them at zero, so bind zeros.
    resolve = sme._GraphExecutor._resolve_tensor  # noqa: SLF001

    def resolve_state(self: Any, tensor_name: str, env: dict) -> Any:
        try:
            return resolve(self, tensor_name, env)
        except sme.ModelIRSavedModelExportError:
            meta = self.model_ir.tensors.get(str(tensor_name))
            if meta is None or meta.data is not None or not (meta.is_variable or str(tensor_name).endswith(
                    ("_state", "_zero"))) or any(int(d) < 0 for d in meta.shape):
                raise
            env[str(tensor_name)] = tf.zeros([int(d) for d in meta.shape], dtype=sme._tf_dtype_from_tensor_ir(meta))  # noqa: SLF001
            return env[str(tensor_name)]

    sme._GraphExecutor._resolve_tensor = resolve_state  # noqa: SLF001

    # Its LSTM/GRU/RNN kernels loop with tf.scan, a WHILE op in TFLite, whose int8
    # calibration crashes; over a static sequence length, unroll the loop instead.
    scan = tf.scan

    def unrolled_scan(fn: Any, elems: Any, initializer: Any = None, *args: Any, reverse: bool = False, **kw: Any) -> Any:
        first = tf.nest.flatten(elems)[0]
        steps = first.shape[0] if first.shape.rank else None
        if steps is None or initializer is None or reverse or args:
            return scan(fn, elems, initializer, *args, reverse=reverse, **kw)
        acc, outs = initializer, []
        for t in range(int(steps)):
            acc = fn(acc, tf.nest.map_structure(lambda e: e[t], elems))
            outs.append(acc)
        return tf.nest.map_structure(lambda *xs: tf.stack(xs, axis=0), *outs)

    sme.tf.scan = unrolled_scan

    # ARG_MAX/ARG_MIN carry their axis as a 1-element tensor; tf.argmax wants a scalar
    # (it only notices once shapes are static, as they are after unrolling).
    def arg_kernel(is_max: bool) -> Any:
        def kernel(executor: Any, op: Any, env: Any) -> None:
            x = executor._resolve_tensor(op.inputs[0], env)  # noqa: SLF001
            axis = tf.reshape(tf.cast(executor._resolve_tensor(op.inputs[1], env), tf.int32), [])  # noqa: SLF001
            out_type = sme._TF_DTYPE_BY_TFLITE_DTYPE.get(str(op.options.get("outputType", "INT64")).upper(), tf.int64)  # noqa: SLF001
            y = (tf.argmax if is_max else tf.argmin)(x, axis=axis, output_type=out_type)
            executor._assign_outputs(op, [y], env)  # noqa: SLF001
        return kernel

    sme._REGISTERED_KERNELS["ARG_MAX"] = arg_kernel(True)  # noqa: SLF001
    sme._REGISTERED_KERNELS["ARG_MIN"] = arg_kernel(False)  # noqa: SLF001
