"""Peak dense BF16 tensor-core FLOP/s per GPU, the denominator of MFU, found by the GPU's name.

MFU means something only against the GPU the run is on: an H200 judged against an H100's peak,
or an L4 against anything but an L4, gives a number that looks like a measurement and is not one.
So the peak comes from this table, matched on `torch.cuda.get_device_name()`, and a GPU it does not
know gets no MFU at all rather than a guess. (After nanochat's `get_peak_flops`.)

Every value is the DENSE BF16 tensor-core rate with FP32 accumulation, as NVIDIA's datasheets and
architecture whitepapers give it. Datasheets print the 2:4-sparse rate first, marked with an asterisk,
at twice the dense one; a training step does dense matmuls, so that rate is never the one to use.
MFU in FP8 runs is against this BF16 peak too, as everywhere in this project: it says how far the
run is from what the GPU does in BF16.
"""

from __future__ import annotations

# Most specific first: the first key found in the name wins, so "H100 PCIe" and "H100 NVL" come
# before "H100" (the SXM part, which torch names "NVIDIA H100 80GB HBM3"), and "L40S" and "L40"
# before "L4". Keys are matched without regard to case ("NVIDIA A100-PCIE-40GB"). A variant with a
# suffix the table lacks takes its base part's line (an RTX 3090 Ti reads as a 3090): add its own
# line above the base one when it matters.
PEAK_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),  # H100 datasheet: 1,671 TFLOPS with sparsity
    ("H100 PCIe", 756e12),  # H100 datasheet: 1,513 with sparsity
    ("H100", 989e12),  # H100 SXM: 1,979 with sparsity
    ("H200 NVL", 835e12),  # H200 datasheet: 1,671 with sparsity
    ("H200", 989e12),  # H200 SXM: 1,979 with sparsity (the H100's compute, more and faster memory)
    ("A100", 312e12),  # A100 datasheet, SXM and PCIe alike: 312 dense, 624 with sparsity
    # NVIDIA publishes no A10G datasheet (an AWS-only part): 80 SMs x 1.71 GHz x 512 BF16 FLOP per
    # clock and SM, the GA102 rate with FP32 accumulation of the GeForce cards (the A10 has twice it).
    ("A10G", 70e12),
    ("L40S", 362e12),  # L40S datasheet: 362.05 dense, 733 with sparsity
    ("L40", 181e12),  # L40 datasheet: 181.05 dense, 362.1 with sparsity
    ("L4", 121e12),  # L4 datasheet: 242 with sparsity
    ("RTX 4090", 165.2e12),  # Ada whitepaper: BF16 with FP32 accumulate 165.2 dense, 330.4 with sparsity
    ("RTX 3090", 71e12),  # Ampere GA102 whitepaper: BF16 with FP32 accumulate 71 dense, 142 with sparsity
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense BF16 peak FLOP/s of the GPU torch names `device_name`; None for a GPU not in the table."""
    name = device_name.lower()
    return next((flops for key, flops in PEAK_BF16_DENSE_FLOPS if key.lower() in name), None)
