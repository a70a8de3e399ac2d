import pytest
import torch

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")

# Every device-dependent test runs on each of these; CUDA skips without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def require_peft_route():
    """Skip (module-level where called at import) unless moslora_ext's PEFT route can be used here."""
    from moslora_ext.peft_support import unsupported_peft_reason

    reason = unsupported_peft_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
