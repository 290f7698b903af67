"""Relax IR passes of the compiler: physical removal of pruned channels, and cost counting on the IR."""

from passes.analysis import count_flops
from passes.strip_zero_channels import StripZeroChannels, report_totals, strip_zero_channels

__all__ = ["StripZeroChannels", "count_flops", "report_totals", "strip_zero_channels"]

# int8 quantization (issue 6): calibration, int8 compute, int8-stored weights
# (the function quantize is not re-exported: it would shadow the submodule passes.quantize)
from passes.quantize import QuantConfig, calibrate, config_for, constant_bytes, quantize_weights  # noqa: E402

__all__ += ["QuantConfig", "calibrate", "config_for", "constant_bytes", "quantize_weights"]
