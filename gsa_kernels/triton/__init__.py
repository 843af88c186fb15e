"""Triton backend (being built in the Triton issue)."""


def status():
    return False, "Triton kernels not implemented yet"
