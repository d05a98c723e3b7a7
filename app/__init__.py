"""Squeeze HTTP service. Never imports torch: the heavy lifting lives in worker/."""
