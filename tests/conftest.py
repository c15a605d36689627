# SPDX-License-Identifier: GPL-2.0-only
import os
import signal

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def workload():
    from textpoke.sim import boot_workload
    return boot_workload(ncpus=4, seed=1)


@pytest.fixture
def core(workload):
    from textpoke import TextPoke
    return TextPoke(workload.sim)


def pytest_configure(config):
    # A shell without job control starts a background job (`make test &`,
    # some CI runners) with SIGINT ignored, and an ignored signal stays
    # ignored in every process the tests start: the tests that send SIGINT
    # to a patcher would see it do nothing.  A handler, unlike SIG_IGN, is
    # reset by exec, so the children start with Python's own Ctrl-C again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "kernel: boots Debian's kernel under QEMU (make test-kernel; "
                   "set TEXTPOKE_KERNEL_TESTS=1 to run them)")
