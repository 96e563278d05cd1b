"""Artifacts made from an opened checkpoint and checked as they are made, for the jobs that write them.

A level of its own between ``verification`` and ``jobs``: ``epcli collapse`` and ``epcli export --safetensors``
write the same collapsed checkpoint (planned, streamed, checked layer by layer) and the same provenance, and a
job never imports another job, so what they share lives here.
"""
