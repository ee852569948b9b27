"""Import a saved ``torch.export`` ExportedProgram as a module-level fx graph qfold's passes read.

An ExportedProgram's graph is functional: ``aten.conv2d(x, weight, bias, ...)`` with the weights
as attributes, ``aten.batch_norm(...)`` with the running statistics as buffers. The fold, bound and
quantization passes work on module calls (``nn.Conv2d`` followed by ``nn.BatchNorm2d``), so each
weighted aten op is turned back into the module it came from, named after its weight's qualified
name (``layer1.conv1.weight`` -> module ``layer1.conv1``); ReLU/ReLU6, add and cat become their
module/function forms, and every other aten op stays as it is (it runs unchanged).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_CONVT_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * n if len(v) == 1 else v)


def _owner(node: fx.Node, what: str) -> str:
    if node.op != "get_attr":
        raise ValueError(f"{what} reads a computed weight ({node.name}); qfold imports ExportedPrograms whose weights are parameters")
    return str(node.target).rpartition(".")[0]


class _Builder:
    def __init__(self, src: fx.GraphModule) -> None:
        self.src, self.root, self.graph = src, nn.Module(), fx.Graph()
        self.env: dict[fx.Node, Any] = {}

    def add(self, name: str, module: nn.Module) -> str:
        parent = self.root
        *path, leaf = name.split(".") if name else ["module"]
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        if hasattr(parent, leaf):
            raise ValueError(f"two layers of the ExportedProgram share the weights of '{name}'; qfold needs one module per layer")
        parent.add_module(leaf, module)
        return name

    def call_module(self, name: str, module: nn.Module, x: fx.Node) -> fx.Node:
        return self.graph.call_module(self.add(name, module), (self.env[x],))


def _attr(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def _conv(b: _Builder, n: fx.Node, transposed: bool, args: list) -> fx.Node:
    x, w, bias = args[0], args[1], args[2]
    weight = _attr(b.src, w.target).detach()
    k = weight.dim() - 2
    stride, padding, dilation = (_tuple(a, k) for a in args[3:6])
    out_pad, groups = (args[7], args[8]) if transposed else ((0,) * k, args[6] if len(args) > 6 else 1)
    cls = _CONVT[k] if transposed else _CONV[k]
    c_in = weight.shape[0] if transposed else weight.shape[1] * groups
    c_out = weight.shape[1] * groups if transposed else weight.shape[0]
    extra = {"output_padding": _tuple(out_pad, k)} if transposed else {}
    m = cls(c_in, c_out, tuple(weight.shape[2:]), stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=bias is not None, **extra)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(_attr(b.src, bias.target))
    return b.call_module(_owner(w, n.name), m, x)


def _batch_norm(b: _Builder, n: fx.Node, x: fx.Node, w: Any, bias: Any, mean: fx.Node, var: fx.Node, eps: float) -> fx.Node:
    rank = n.meta["val"].dim() if "val" in n.meta else 4
    running_mean = _attr(b.src, mean.target)
    m = _BN[rank](running_mean.numel(), eps=eps, affine=w is not None).eval()
    with torch.no_grad():
        m.running_mean.copy_(running_mean)
        m.running_var.copy_(_attr(b.src, var.target))
        if w is not None:
            m.weight.copy_(_attr(b.src, w.target))
            m.bias.copy_(_attr(b.src, bias.target))
    return b.call_module(_owner(mean, n.name), m, x)


def from_exported_program(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """A module-level GraphModule computing what ``ep`` computes (one tensor input and output).

    Raises:
        ValueError: the program takes or returns more than one tensor, trains BatchNorm, or shares
            one weight between layers.
    """
    src = ep.module()
    b = _Builder(src)
    relu_count = 0
    for n in src.graph.nodes:
        if n.op == "placeholder":
            b.env[n] = b.graph.placeholder(n.name)
        elif n.op == "get_attr":
            continue  # consumed by the layer that reads it, or re-created below on demand
        elif n.op == "call_module" and not n.users:
            continue  # export's input-guard check (``_guards_fn``): no output, nothing to compute
        elif n.op == "call_function" and n.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
            b.env[n] = _conv(b, n, False, _conv_args(n))
        elif n.op == "call_function" and n.target in _CONVT_OPS:
            args = list(n.args) + [None] * (8 - len(n.args))
            x, w, bias, stride, padding, out_pad, groups, dilation = args
            b.env[n] = _conv(b, n, True, [x, w, bias, stride or 1, padding or 0, dilation or 1, None, out_pad or 0, groups or 1])
        elif n.op == "call_function" and n.target is aten.convolution.default:
            x, w, bias, stride, padding, dilation, transposed, out_pad, groups = n.args
            b.env[n] = _conv(b, n, transposed, [x, w, bias, stride, padding, dilation, groups] if not transposed
                             else [x, w, bias, stride, padding, dilation, None, out_pad, groups])
        elif n.op == "call_function" and n.target is aten.linear.default:
            x, w, bias = (list(n.args) + [None])[:3]
            weight = _attr(src, w.target).detach()
            m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            with torch.no_grad():
                m.weight.copy_(weight)
                if bias is not None:
                    m.bias.copy_(_attr(src, bias.target))
            b.env[n] = b.call_module(_owner(w, n.name), m, x)
        elif n.op == "call_function" and n.target is aten.batch_norm.default:
            x, w, bias, mean, var, training, _momentum, eps = n.args[:8]
            if training:
                raise ValueError("the ExportedProgram runs BatchNorm in training mode; export the model after model.eval()")
            b.env[n] = _batch_norm(b, n, x, w, bias, mean, var, eps)
        elif n.op == "call_function" and n.target is aten._native_batch_norm_legit_no_training.default:
            x, w, bias, mean, var, _momentum, eps = n.args
            b.env[n] = ("bn-tuple", _batch_norm(b, n, x, w, bias, mean, var, eps))
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(b.env.get(n.args[0]), tuple):
            b.env[n] = b.env[n.args[0]][1]
        elif n.op == "call_function" and n.target in (aten.relu.default, aten.relu_.default):
            relu_count += 1
            b.env[n] = b.call_module(f"relu_{relu_count}", nn.ReLU(), n.args[0])
        elif n.op == "call_function" and n.target in (aten.add.Tensor, aten.add_.Tensor) and len(n.args) == 2 and not n.kwargs:
            b.env[n] = b.graph.call_function(operator.add, tuple(_materialize(b, x) for x in n.args))
        elif n.op == "call_function" and n.target is aten.cat.default:
            b.env[n] = b.graph.call_function(torch.cat, tuple(_materialize(b, x) for x in n.args))
        elif n.op == "call_function":
            args = tuple(_materialize(b, x) for x in n.args)
            kwargs = {k: _materialize(b, v) for k, v in n.kwargs.items()}
            b.env[n] = b.graph.call_function(n.target, args, kwargs)
        elif n.op == "output":
            outs = n.args[0]
            outs = outs[0] if isinstance(outs, (list, tuple)) and len(outs) == 1 else outs
            if isinstance(outs, (list, tuple)):
                raise ValueError("the ExportedProgram returns several tensors; qfold handles models with one output")
            b.graph.output(b.env[outs])
        else:
            raise ValueError(f"unsupported node {n.format_node()} in the ExportedProgram")
    gm = fx.GraphModule(b.root, b.graph, class_name="ImportedProgram")
    gm.graph.lint()
    return gm.eval()


def _conv_args(n: fx.Node) -> list:
    args = list(n.args) + [None] * (7 - len(n.args))
    x, w, bias, stride, padding, dilation, groups = args
    return [x, w, bias, stride if stride is not None else 1, padding if padding is not None else 0,
            dilation if dilation is not None else 1, groups if groups is not None else 1]


def _materialize(b: _Builder, x: Any) -> Any:
    """Map an argument into the new graph; attributes not consumed by a layer become buffers."""
    if isinstance(x, (list, tuple)):
        return type(x)(_materialize(b, v) for v in x)
    if not isinstance(x, fx.Node):
        return x
    if x in b.env:
        return b.env[x]
    if x.op == "get_attr":
        name = "imported_" + str(x.target).replace(".", "_")
        if not hasattr(b.root, name):
            b.root.register_buffer(name, _attr(b.src, x.target).detach().clone())
        b.env[x] = b.graph.get_attr(name)
        return b.env[x]
    raise ValueError(f"argument {x.name} of the ExportedProgram was not produced before use")


def _shape_text(shape: Any) -> str:
    dims = [d if isinstance(d, int) else "N" for d in shape]
    return "(" + ", ".join(map(str, dims)) + ")"


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export`` on ``example_inputs`` and rebuild it as module calls.

    For forwards torch.fx cannot trace symbolically (Python control flow over shapes or attributes:
    TF-"same" padding computed from ``x.size()``, an input-shape check against a submodule
    attribute). The batch dimension is exported as dynamic when the model allows it; every other
    dimension is fixed to the example's, so the captured graph is valid for those shapes only.
    ``gm.meta["qfold_capture"]`` says which capture was used and for which input shapes.

    Raises:
        ValueError: ``torch.export`` failed, or the program is not one qfold can rebuild.
    """
    if len(example_inputs) != 1 or not isinstance(example_inputs[0], torch.Tensor):
        raise ValueError("capturing with torch.export needs exactly one example input tensor")
    x = example_inputs[0]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    errors = []
    try:
        for dynamic in ((({0: torch.export.Dim.AUTO},),) if x.dim() > 0 else ()) + (None,):
            try:
                ep = torch.export.export(model, (x,), dynamic_shapes=dynamic, strict=False)
                break
            except Exception as exc:  # noqa: BLE001 - export raises many types; reported below
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            raise ValueError("torch.export failed too: " + " | ".join(errors))
    finally:
        for m, mode in modes.items():
            m.training = mode
    gm = from_exported_program(ep)
    val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name not in ep.graph_signature.inputs_to_parameters
               and n.name not in ep.graph_signature.inputs_to_buffers).meta.get("val")
    shape = tuple(val.shape) if val is not None else tuple(x.shape)
    dyn = any(not isinstance(d, int) for d in shape)
    valid = f"input shape {_shape_text(shape)}" + (" for any batch size N" if dyn else " only (the batch size is fixed too)")
    gm.meta["qfold_capture"] = {"method": "torch.export", "valid_for": valid}
    return gm
