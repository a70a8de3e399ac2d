"""``moslora_ext.Conv``: MoSLoRA adapters on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, in plain PyTorch."""

from torch import nn
from torch.nn import functional as F

from .base import AdapterLayer, class_path

# By the number of spatial dimensions.
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Conv(AdapterLayer):
    """A frozen convolution with MoSLoRA adapters:

        y = conv(x, W) + b + s * B M A(dropout(x))

    ``A`` (``lora_A``, (r, in_channels, *kernel_size)) is a convolution with
    the base layer's kernel size, stride, padding and dilation into r
    channels, ``M`` (``lora_mixer``, (r, r)) a 1x1 mixing of those channels
    and ``B`` (``lora_B``, (out_channels, r, 1, ...)) a 1x1 convolution to the
    output channels; these are PEFT's shapes. Since ``B M`` mixes channels
    only, ``s * B M A`` is itself a kernel of the base's shape, so ``merge()``
    adds it to the weight exactly. Convolutions with ``groups`` other than 1,
    a ``padding_mode`` other than "zeros", or a forward of their own are
    refused.

    The adapter is a plain-PyTorch composition (two convolutions, the
    second 1x1 with ``s * B M`` folded into one small kernel): the base
    convolution dominates its cost, so a fused kernel would not pay.
    Dropout keeps a dropped copy of x here, as PEFT does. Create with
    ``Conv.from_module(conv, r=..., ...)`` or ``moslora_ext.add_adapters``.
    """

    @classmethod
    def refusal_reason(cls, module):
        kind = class_path(module)
        if not isinstance(module, tuple(CONV_MODULES.values())):
            return f"is a {kind}, not a torch.nn.Conv1d, Conv2d or Conv3d"
        if type(module).forward not in {m.forward for m in CONV_MODULES.values()}:
            return f"is a {kind}, a convolution subclass with a forward of its own"
        if module.groups != 1:
            return f"is a {kind} with groups={module.groups}; MoSLoRA convolution adapters need groups=1"
        if module.padding_mode != "zeros":
            return (f"is a {kind} with padding_mode={module.padding_mode!r}; MoSLoRA convolution adapters need "
                    "padding_mode='zeros'")
        return super().refusal_reason(module)

    @classmethod
    def factor_shapes(cls, weight, r):
        out_channels, *in_kernel = weight.shape
        ones = [1] * (len(in_kernel) - 1)  # B is a 1x1 convolution
        return {"lora_A": (r, *in_kernel), "lora_mixer": (r, r), "lora_B": (out_channels, r, *ones)}

    @staticmethod
    def _as_matrix(weight):
        # The kernel as (out_channels, in_channels * prod(kernel_size)): a view, never a copy.
        return weight.view(weight.shape[0], -1)

    def _keep_base_settings(self, module):
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (
            module.kernel_size, module.stride, module.padding, module.dilation)
        self._conv = CONV_FUNCTIONS[len(module.kernel_size)]

    def base_forward(self, x):
        return self._conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def add_adapter_output(self, base_out, x, adapter):
        config = adapter.config
        dropout_p = config.lora_dropout if self.training else 0.0
        return base_out + self.update(self._conv, x, adapter.lora_A, adapter.lora_mixer, adapter.lora_B, config.scale,
                                      dropout_p, self.stride, self.padding, self.dilation)

    @staticmethod
    def update(conv, x, lora_A, mixer, lora_B, scale, dropout_p, stride, padding, dilation):
        """``s * B M A(dropout(x))`` with the convolution function ``conv``
        (F.conv2d...): A with the base's stride, padding and dilation, then
        ``s * B M`` as one 1x1 kernel (also the PEFT route's convolutions)."""
        # fp32 adapters on a half-precision base compute in x's dtype, as the fused linear ops do.
        lora_A, mixer, lora_B = (t.to(x.dtype) for t in (lora_A, mixer, lora_B))
        # Not F.dropout(x, p, p > 0): where Dynamo compiles p as a symbolic float (a second
        # value of it), p > 0 is a SymBool, which F.dropout's bool argument refuses.
        dropped = F.dropout(x, dropout_p) if dropout_p > 0 else x
        u = conv(dropped, lora_A, None, stride, padding, dilation)
        return conv(u, (scale * (lora_B.flatten(1) @ mixer)).view_as(lora_B))

    def _empty_base(self):
        return CONV_MODULES[len(self.kernel_size)](self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                                   self.padding, self.dilation, bias=self.bias is not None)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"{super().extra_repr()}")
