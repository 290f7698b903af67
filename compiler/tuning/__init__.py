"""Kernel tuning with MetaSchedule, and the tuning databases ``build`` applies.

- :mod:`compiler.tuning.database`: the database folders (tuning_logs/<target>/<model>-<variant>/): their format,
  :func:`~compiler.tuning.database.open_database`, and which database fits which target, CPU and module.
- :mod:`compiler.tuning.session`: a tuning run (:class:`~compiler.tuning.session.TuneSettings`,
  :func:`~compiler.tuning.session.tune`): task extraction, MetaSchedule's search, builder and runner, progress.
- :mod:`compiler.tuning.tracker`: the TVM RPC tracker a session measures through, and a watch on its servers.
- :mod:`compiler.tuning.tvm_compat`: every workaround for TVM 0.27's MetaSchedule.
- :mod:`compiler.tuning.cli`: the ``tune`` verb (flags -> settings, the printed table).

The verb is ``python -m compiler tune``; the Python API is ``compiler.tune(...)``. Importing this package is light
(no TVM).
"""
