"""The floor every other package stands on: errors and exit codes, atomic writes and JSON reading,
progress on stderr, process groups, the device and dtype policy, and downloads. Nothing here imports
from the rest of ``blip2cli``."""

__version__ = "0.1.0"
