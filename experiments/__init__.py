"""The project's experiments, outside the library: what turns ``structsparse run`` directories into the
committed results, and the peers' training.

* :mod:`.runs`: run folders and result folders shared by every experiment (the ``structsparse`` command,
  copying a run into ``results/``, reloading and verifying committed models, README tables between markers);
* :mod:`.mnist`: the MNIST rows' places and the shapes of their compact models;
* :mod:`.mnist_select`: the selection rule among candidate runs, and the verdict against the paper's row;
* :mod:`.mnist_assemble`, :mod:`.mnist_figures`: a row's ``results/mnist/table/<row>/``;
* :mod:`.mnist_seeds`: a row repeated with other seeds;
* :mod:`.mnist_tables`: the tables of ``results/mnist/README.md``;
* :mod:`.resnet`: the ResNet-20 / Fashion-MNIST rows (``results/fmnist/resnet20/``);
* :mod:`.peers`: the MNIST peers' training (through :class:`structsparse.runner.trainer.Trainer`) and counts.

The paper's figures are read from :mod:`structsparse.paper` only. The command lines are ``scripts/`` and
``benchmarks/``; ``python -m pytest`` finds this package through ``pythonpath`` in pyproject.toml.
"""
