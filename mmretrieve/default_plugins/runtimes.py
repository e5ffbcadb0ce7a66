"""The built-in inference runtimes."""

from mmretrieve import hookimpl
from mmretrieve.specs import RuntimeSpec


@hookimpl
def register_runtimes(register):
    register(RuntimeSpec(name="torch", factory="mmretrieve.runtime.torch_runtime:TorchEmbedder",
                         description="PyTorch, on CUDA when present (model bundles)"))
    register(RuntimeSpec(name="onnx", factory="mmretrieve.runtime.onnx_runtime:OnnxEmbedder",
                         description="onnxruntime on TensorRT, CUDA or CPU, without torch (`mmretrieve export` folders)"))
