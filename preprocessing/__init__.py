"""Raw text to Megatron indexed shards: read -> normalize -> tokenize -> filter -> dedup.

``python -m preprocessing`` (:mod:`preprocessing.__main__`) turns its flags into
:class:`preprocessing.plan.Options`; :func:`preprocessing.executors.run` plans the run
(:mod:`preprocessing.plan`: shards, work folder) and runs the stages of
:mod:`preprocessing.stages` (prepare, candidates, verify, components, write, finalize) on
datatrove's executors: without ``--executor``, one task per stage in this process, the
prepare stage with ``--workers`` tokenizer processes (:mod:`preprocessing.workers`); with
``--executor local|slurm``, ``--tasks`` shards. The output is byte-identical for any
executor, task and worker count.

Modules import one way only (``tests/test_imports.py`` checks that there is no circle):
:mod:`~preprocessing.readers`, :mod:`~preprocessing.normalize`,
:mod:`~preprocessing.sentences`, :mod:`~preprocessing.dedup` and
:mod:`~preprocessing.lifeline` import no other module of this package;
:mod:`~preprocessing.workers` imports those; :mod:`~preprocessing.plan`
imports readers; :mod:`~preprocessing.stages` imports plan and workers;
:mod:`~preprocessing.executors` imports plan, stages and lifeline (and names
:mod:`~preprocessing.forkserver_preload`, which imports lifeline, for datatrove's forkserver).
"""
