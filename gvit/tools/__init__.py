"""The jobs that write folders (what the ``gvit`` commands run), above the library:

* :mod:`~gvit.tools.fit_files` (``gvit fit``), :mod:`~gvit.tools.fit_dataset` (``gvit fit-dataset``);
* :mod:`~gvit.tools.report` (``gvit report``), :mod:`~gvit.tools.demo` (``gvit demo``, ``gvit fit-demo``);
* :mod:`~gvit.tools.explain` (``gvit explain``), :mod:`~gvit.tools.interpret` (``gvit interpret``);
* :mod:`~gvit.tools.leakage` (``gvit leakage``), :mod:`~gvit.tools.sweep` (``gvit sweep``);
* :mod:`~gvit.tools.tokens` (``gvit tokens``), :mod:`~gvit.tools.vl_eval` (``gvit vl-eval``);
* :mod:`~gvit.tools.artifacts`: figures, tables and HTML pages they share.
"""
