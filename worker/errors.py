"""Errors a job can end with. Their message is what the user reads on the failed job."""

from __future__ import annotations


class JobFailure(Exception):
    """A failure with a message fit for the user (bad model id, unsupported architecture, ...)."""


class JobCancelled(Exception):
    """The user cancelled the job; raised between layers."""


class LostOwnership(Exception):
    """Our lease or attempt is no longer current: another worker owns the job now. Stop writing."""
