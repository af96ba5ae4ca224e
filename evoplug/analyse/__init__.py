"""Compile time, part 1: one recorded forward (``calibrate``) and the torch.fx analysis of each
candidate block. The only place torch.fx traces anything."""
