"""Placeholder until its issue lands: installs nothing."""


def install(handle):
    return None
