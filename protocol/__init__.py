"""The contract between server and modules, and the little runtime both share.

Nothing here imports ``server`` or ``modules``: the arrows point in, never out.
"""

PROTOCOL_VERSION = 1
