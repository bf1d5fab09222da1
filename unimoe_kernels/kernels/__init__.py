"""Triton kernels (@triton.jit only); launchers and autograd live in unimoe_kernels.ops.

Deliberately empty of imports: importing a module here imports triton, which must happen only when
a kernel is about to launch (after TRITON_INTERPRET has been decided) and never on `import
unimoe_kernels`.
"""
