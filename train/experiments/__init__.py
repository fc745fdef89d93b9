"""The research suite: synthetic capability tasks × model variants × sequence lengths × seeds.

``wuneng experiment configs/experiments/<name>.yaml`` trains every run of the grid (resumable), scores
each on fresh held-out examples with an exact accuracy metric and writes ``results.csv``,
``results.json``, ``summary.md`` and plots into the experiment directory. Modules, in the order a run
goes through them: ``spec`` (the experiment file and the run grid), ``params`` (matched parameter
counts), ``runner`` (training via ``train.trainer.Trainer``, resume, progress), ``accuracy`` (the
jitted exact-accuracy eval), ``report`` (tables and plots). The tasks themselves live in
``train.data.synthetic``. See ``docs/research.md``.
"""
