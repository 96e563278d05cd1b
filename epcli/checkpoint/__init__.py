"""The checkpoint schema: metadata, architecture specs, input specs, foreign files, and saving / loading.

The API (:func:`save_checkpoint`, :func:`open_checkpoint`, ...) is re-exported from :mod:`epcli`.
"""
