"""Planning a GPU run on any machine: the train step compiled for H100/H200s that are not here
(XLA's deviceless compilation), its memory, collectives and kernels reported (`--compile-only`)."""
