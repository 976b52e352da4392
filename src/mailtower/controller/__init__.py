"""The controller side: the inventory, the lab, DNS publishing, SQL failover commands.

Not in the hosts' wheel (pyproject excludes it): tower hosts never run this code.
"""
