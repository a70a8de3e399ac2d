import pytest
import torch

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")

# Every device-dependent test runs on each of these; CUDA skips without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
