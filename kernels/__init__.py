"""megamoe's Triton kernels, installed under the import name `megamoe_kernels`.

Device code only: no torch.nn, no megamoe imports. The torch-facing ops, their autograd and their
slow reference twins live in `megamoe/ops`.
"""
