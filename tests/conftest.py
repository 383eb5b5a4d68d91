"""Every Ray a test starts listens on loopback only (issue #21 item 9), as `dsarl` runs do: the switch
must be in the environment before Ray is imported (see launch/ray_setup.py)."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
