"""The tower's monitor: health-checks the scanners, drains/enables them in the relay's HAProxy."""
