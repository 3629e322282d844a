"""The constants of the rasterization spec, shared by every backend.

numba compiles these into the cached CPU kernels and keys its cache on _cpu_kernels.py only:
after changing a value here, delete gvit/render/__pycache__/_cpu_kernels.*.nb[ic] (or touch
_cpu_kernels.py) so the kernels are rebuilt.
"""

ALPHA_MIN = 1.0 / 255.0  # a Gaussian adds nothing to a pixel where its alpha is below this
ALPHA_MAX = 0.999  # alpha cap (alpha mode)
T_MIN = 1e-4  # a pixel stops at the first Gaussian that would take its transmittance to <= this
