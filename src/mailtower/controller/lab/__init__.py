"""The lab: throwaway towers on this machine, built with LXC and deployed with the real code."""
