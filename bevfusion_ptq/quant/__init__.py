"""Quantization: declared rules, quantized modules, BN fusion, calibration."""

import logging

# pytorch-quantization logs through absl once per quantizer whenever calibration is switched
# on or off ("Disable MaxCalibrator") or a state dict is loaded ("Overwriting amax"): hundreds
# of lines per run that hide the real ones, in a script as much as in the CLI. Only its errors
# are kept. A caller that wants them back sets the "absl" logger's level after importing us.
logging.getLogger("absl").setLevel(logging.ERROR)
