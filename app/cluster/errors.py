"""The root of the cluster's exception tree.

Every adapter of app/cluster translates the errors of the outside world (netlink, sockets,
processes) into a subclass of ``ClusterError`` whose message names what failed
("interface eth9 does not exist"), raised ``from`` the original exception. Callers above the
cluster layer catch ``ClusterError`` only.

    ClusterError
     +-- VipError          (vip.py)
     +-- GuardianError     (guardian.py)
     +-- ScriptError       (scripts.py)
"""

from __future__ import annotations


class ClusterError(Exception):
    """Base of every error raised by the cluster layer."""
