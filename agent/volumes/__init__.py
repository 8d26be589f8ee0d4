"""Volumes: publish, unpublish and renew, and what they stand on.

The manager, the metadata store and payload writer, mounts, per-volume locks, the renewal schedule.
"""
