"""Relax IR passes of the compiler: physical removal of pruned channels, and cost counting on the IR."""

from passes.analysis import count_flops
from passes.strip_zero_channels import StripZeroChannels, report_totals, strip_zero_channels

__all__ = ["StripZeroChannels", "count_flops", "report_totals", "strip_zero_channels"]
