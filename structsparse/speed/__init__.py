"""Where a speed is measured: timing primitives and the machine stamp (:mod:`.timing`, imports only torch,
so that compaction can time candidate kernels), a compact model against its original (:mod:`.measure`),
and the paper's layer benchmarks (:mod:`.layer_bench`)."""
