"""The op layer: one folder per op family (kernels, torch path, reference, ops, public functions) on a
shared registry (``registry``), argument checks (``checks``), position resolution (``positions``) and
angle algorithms (``angles``)."""
