"""mirrorgate gates: pure streaming statistics, decision engine and harvest rules.

numpy/scipy only for the statistics; no I/O, no aiohttp, no SQLAlchemy, so the same
objects run online in the proxy and offline in ``mirrorgate replay``.
"""
