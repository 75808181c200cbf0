"""The MFU denominator: each GPU's dense BF16 peak, found by the name torch gives it."""

import pytest

from train.flops import PEAK_BF16_DENSE_FLOPS, peak_bf16_flops


@pytest.mark.parametrize("device_name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10G", 70e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
])
def test_known_gpus_get_their_own_dense_peak(device_name, flops):
    assert peak_bf16_flops(device_name) == flops


@pytest.mark.parametrize("device_name", ["NVIDIA GeForce GTX 1080", "Tesla T4", "NVIDIA B200", "AMD Instinct MI300X",
                                         "cpu", ""])
def test_an_unknown_gpu_gets_no_peak_rather_than_a_guess(device_name):
    assert peak_bf16_flops(device_name) is None


def test_no_key_is_shadowed_by_an_earlier_one():
    """First match wins: a key that contains an earlier key would never be reached."""
    keys = [key.lower() for key, _ in PEAK_BF16_DENSE_FLOPS]
    for i, key in enumerate(keys):
        assert not any(earlier in key for earlier in keys[:i]), key
