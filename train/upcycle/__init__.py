"""Upcycling a Qwen2 checkpoint into WuNeng: the ``align`` -> ``distill`` -> ``sft`` stages (ARWKV's recipe).

A stage is the ``stage`` section of an ordinary training config, so ``wuneng train`` runs any one of
them with the Trainer's mesh, checkpoints, resume and metrics; the stage only changes

* where the weights start (``stage.init_from``: a Hugging Face Qwen2 directory, upcycled; a previous
  stage's run directory) -- :mod:`train.upcycle.sources`;
* what is trained (``stage.trainable`` / ``stage.freeze``, named groups or regexes; frozen parameters
  get no optimizer state and stay bit-identical) -- :mod:`train.upcycle.params`;
* the objective and its frozen inputs (the teacher, in the same jitted step) --
  :mod:`train.upcycle.objectives`;
* the data (chat jsonl for SFT: :mod:`train.data.chat`).

:mod:`train.upcycle.stage` turns a config into that plan for the Trainer; :mod:`train.upcycle.pipeline`
runs the three stages in order (``wuneng upcycle``) and exports the result as a Hugging Face-style
WuNeng directory. User guide: ``docs/upcycling.md``.
"""
