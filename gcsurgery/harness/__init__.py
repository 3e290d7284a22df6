"""The experiment harness: everything that trains, measures and reports, on top of the core (which never imports it).

Rooms, one idea each:

- `data` (datasets on disk: IDX, CIFAR-10, image folders) and `loader` (in-memory batches, splits, seeds);
- `datasets` (the train / validation / test loaders of one run);
- `models` (CIFAR ResNets and plain nets, timm, torchvision, ``module:factory``) and `names` (model-name
  checks and suggestions without importing torch);
- `arms` (an arm and its optimizer from a spec such as ``gcgd:ode.gate_init=0.1``);
- `config` (`RunConfig` and its command-line parser), `loop` (the epoch loop), `run` (the one `Run`);
- `report` (paired statistics, tables, plots, the coverage document);
- `demo` and `sweep`, which the ``gcsurgery`` command runs.

Submodules are imported by name (``from gcsurgery.harness.run import Run``); this package imports nothing,
so that the command line answers ``--help`` before torch loads.
"""
