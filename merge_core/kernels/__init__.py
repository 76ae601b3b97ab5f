"""The tensor math under the merge methods: chunked passes, caches, sparsification, fused kernels.

:mod:`merge_core.methods` holds the method classes (what mergekit calls a ``merge_method``);
everything they compute with lives here, in modules that import each other only downwards
(no cycles, and nothing here imports :mod:`merge_core.methods`)::

    inputs         TensorInputs, TensorParams: what a method is given for one tensor
    chunking       chunk sizes, flat views, the output Target          <- inputs
    caches         per-tensor caches in TensorInputs.cache             <- inputs
    task_vectors   d = model - base, |d| as numpy, the L1 rescale      <- chunking
    plans          Plan, Cut: one model's sparsification for one call
    native         C helpers compiled on first use (DELLA's lookup)
    random_fields  uniform 16-bit draws, their L1 lookup, draw_seed    <- caches, task_vectors
    magnitude      TIES / breadcrumbs plans from order statistics      <- caches, plans, task_vectors
    della          DELLA's MAGPRUNE mask, keyed and general forms      <- native, random_fields, plans
    sparsify       make_plan (picks one of the above), Masker          <- magnitude, della
    fused          torch.compile kernels for the in-memory hot loop    <- sparsify, della
                   (task arithmetic family, lincomb, nearswap, ram)
    lincomb        sum_i c_i * x_i, eager or fused                     <- fused, chunking
    gram           dot products of whole tensors (spherical means)     <- caches, chunking

Importing this package imports none of them (``torch.compile`` is only reached when a fused
kernel is first called).
"""
