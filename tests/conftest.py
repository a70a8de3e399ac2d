import os
import subprocess
import sys

import pytest
import torch

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")

# Every device-dependent test runs on each of these; CUDA skips without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]


@pytest.fixture(autouse=True)
def seeded_rng():
    """Each test draws the same data however the suite is selected or ordered: a test's outcome
    must not depend on which tests ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def require_peft_route():
    """Skip (module-level where called at import) unless moslora_ext's PEFT route can be used here."""
    from moslora_ext.peft.compat import unsupported_peft_reason

    reason = unsupported_peft_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)


def run_python(code, pythonpath=()):
    """Run ``code`` in a new interpreter, with ``pythonpath`` ahead of the inherited PYTHONPATH. It runs
    in the tests folder: at the repository root the source tree would hide the installed package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
