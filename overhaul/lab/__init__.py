"""The lab: a practice farm of real hosts on one machine (namespaces, sshd, supervisord, MariaDB, apt)."""

from overhaul.lab.host import HostSpec, LabHost
from overhaul.lab.lab import HostStatus, Lab

__all__ = ["HostSpec", "HostStatus", "Lab", "LabHost"]
